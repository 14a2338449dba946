"""compress: global magnitude pruning + int8 weight quantization of the fine-tuned model, then the
compressed variant is reloaded from disk and evaluated per domain like the original."""
from __future__ import annotations

import logging

from prefect import task

from mdcore.compress import load_compressed, prune_global, save_compressed
from mdcore.io import dir_size_bytes
from mdcore.model import WEIGHTS, load_model
from tasks.evaluate import per_domain_accuracy, summarize
from tasks.params import CompressParams
from tasks.paths import Paths
from tasks.stage import StageResult, execute

log = logging.getLogger("mdpipe.compress")


def run(params: CompressParams, paths: Paths) -> StageResult:
    model = load_model(paths.finetuned)
    sparsity = prune_global(model, params.prune_amount)
    recipe = {"source": str(paths.finetuned.relative_to(paths.root)), "prune": {"method": "global_l1_unstructured",
              "amount": params.prune_amount}, "quantize": params.quantize, "format": "safetensors"}
    save_compressed(model, paths.compressed, recipe, quantize=params.quantize == "int8")
    compressed = load_compressed(paths.compressed)
    table = per_domain_accuracy(compressed, paths, params.batch_size)
    original_bytes = (paths.finetuned / WEIGHTS).stat().st_size
    compressed_bytes = (paths.compressed / WEIGHTS).stat().st_size
    log.info("compressed %.2f MB -> %.2f MB (sparsity %.2f)", original_bytes / 1e6, compressed_bytes / 1e6, sparsity)
    metrics = {
        "original_bytes": original_bytes,
        "compressed_bytes": compressed_bytes,
        "compressed_folder_bytes": dir_size_bytes(paths.compressed),
        "size_ratio": compressed_bytes / original_bytes,
        "sparsity": sparsity,
        **summarize(table),
    }
    return StageResult({"compressed": str(paths.compressed)}, metrics)


@task(name="compress")
def compress_task(root: str = ".") -> dict:
    """Prefect task: the compress stage."""
    return execute("compress", root)
