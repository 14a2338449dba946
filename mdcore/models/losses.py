"""Training objectives: classification, contrastive (SimCLR, supervised across domains), domain
alignment (CORAL, MMD), knowledge distillation and the mixture-of-experts load-balancing term."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's normalized temperature-scaled cross-entropy (Chen et al., 2020): two views of each image
    are positives, every other image in the batch is a negative."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                        reduction: str = "mean", weight: torch.Tensor | None = None,
                        logit_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy; ``weight``: one weight per image (class re-weighting, mean 1 over the training set, so
    the loss keeps its scale); ``logit_offset``: (N, C) added to the logits in training only (logit
    adjustment: the model then predicts with plain logits, its class prior taken out)."""
    if logit_offset is not None:
        logits = logits + logit_offset.to(logits.dtype)
    if weight is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)
    per_image = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none") * weight.to(logits.dtype)
    return per_image if reduction == "none" else per_image.sum() if reduction == "sum" else per_image.mean()


CLASS_BALANCE = ("none", "reweight", "logit_adjust")


class ClassBalance:
    """Per-domain class balancing of the cross-entropy, from the training images' (domain, class) counts:
    ``reweight`` weights an image by n_domain / (classes present x n_(domain, class)) (inverse class
    frequency within its domain, mean 1 over the training set); ``logit_adjust`` adds log p(class | domain)
    to the logits in training (Menon et al., 2021), so a rare class needs less evidence at prediction.
    Per domain, because a class rare in one domain (a site that seldom sees it) may be common in another."""

    def __init__(self, mode: str, labels: torch.Tensor, domains: torch.Tensor, n_domains: int, n_classes: int):
        if mode not in CLASS_BALANCE:
            raise ValueError(f"class_balance={mode!r}: expected one of {list(CLASS_BALANCE)}")
        self.mode = mode
        keep = domains >= 0
        counts = torch.zeros(n_domains, n_classes)
        counts.index_put_((domains[keep], labels[keep]), torch.ones(int(keep.sum())), accumulate=True)
        self.counts = counts
        per_domain = counts.sum(1, keepdim=True)
        present = (counts > 0).sum(1, keepdim=True).clamp(min=1)
        self.weights = torch.where(counts > 0, per_domain / (present * counts.clamp(min=1)), torch.zeros(()))
        prior = counts.clamp(min=1) / counts.clamp(min=1).sum(1, keepdim=True)
        self.log_prior = prior.log()

    def terms(self, labels: torch.Tensor, domains: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(per-image weight, (N, C) logit offset) of a batch, each None when this mode does not use it."""
        d = domains.clamp(min=0).cpu()
        if self.mode == "reweight":
            return self.weights[d, labels.cpu()].to(labels.device), None
        if self.mode == "logit_adjust":
            return None, self.log_prior[d].to(labels.device)
        return None, None


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor | None = None,
                temperature: float = 0.1, cross_domain_only: bool = False) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020): images of the same class are positives, so
    same-class images of *other domains* are pulled together. With ``cross_domain_only`` only
    other-domain images of the same class count as positives. Anchors without a positive are skipped;
    returns 0 (still differentiable) when no anchor has one."""
    z = F.normalize(z.float(), dim=1)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    if cross_domain_only and domains is not None:
        pos &= domains[:, None] != domains[None, :]
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(1)[has]) / n_pos[has]
    return per_anchor.mean()


def coral(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko, 2016): squared distance between the feature covariances (and means)."""
    a, b = a.float(), b.float()
    mean_gap = (a.mean(0) - b.mean(0)).pow(2).mean()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    return mean_gap + (ca - cb).pow(2).mean()


def mmd(a: torch.Tensor, b: torch.Tensor, gammas=(0.001, 0.01, 0.1, 1, 10, 100, 1000)) -> torch.Tensor:
    """Maximum mean discrepancy with a mixture of Gaussian kernels (as in DomainBed's MMD)."""
    a, b = a.float(), b.float()

    def kernel(x, y):
        d = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-g * d) for g in gammas) / len(gammas)

    return kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean()


def domain_alignment(feats: torch.Tensor, domains: torch.Tensor, kind: str = "coral") -> torch.Tensor:
    """Mean CORAL or MMD penalty over every pair of domains present (with at least 2 images each)."""
    if kind not in ("coral", "mmd"):
        raise ValueError(f"alignment {kind!r}: expected 'coral' or 'mmd'")
    fn = coral if kind == "coral" else mmd
    groups = [feats[domains == d] for d in domains.unique() if int(d) >= 0]
    groups = [g for g in groups if len(g) >= 2]
    terms = [fn(groups[i], groups[j]) for i in range(len(groups)) for j in range(i + 1, len(groups))]
    if not terms:
        return feats.sum() * 0.0
    return torch.stack(terms).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 4.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015): KL(teacher || student) on temperature-softened
    distributions, times T^2 so its gradient scale does not depend on T."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    p_teacher = F.softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t


def load_balancing_loss(gate_probs: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing: E * sum_e (share of images whose top expert is e) x (mean gate
    probability of e); 1.0 when balanced, up to E when one expert takes everything."""
    n_experts = gate_probs.shape[1]
    top = F.one_hot(gate_probs.argmax(1), n_experts).to(gate_probs.dtype).mean(0)
    return n_experts * (top * gate_probs.mean(0)).sum()
