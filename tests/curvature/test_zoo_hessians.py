"""Any batch, any loss, any layer (issue 12): the curvature engine and the measures on the zoo's models,
checked against dense float64 Hessians by reverse-over-reverse autograd of losses written out here.

What is differentiated with Dropout: the eval-mode loss (Dropout off: the network's deterministic,
weight-scaled expectation), whatever mode the module is in; BatchNorm on its running statistics
(``bn_mode="eval"``). So the references below are computed with the module in eval mode, while the
operator is handed the module in train mode (Dropout on) and must leave it so.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _support import dense_hessian, flat_parameter_loss
from _zoo import DictDataset, DictModule, MultiInput, TinyGPT, TinyLSTM, TinyResNet, gpt_data, make
from lightning.pytorch import Trainer
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import default_collate

from lightning_optsurvey.callbacks import GeneralizationGap, HessianSpectrum, measuring
from lightning_optsurvey.callbacks._measure import resolve_loss_fn
from lightning_optsurvey.curvature import HessianOperator, MissingDerivativeError, ModuleLoss, PairLoss
from lightning_optsurvey.measures import fisher_rao_norm, sam_sharpness
from lightning_optsurvey.measures._functional import FlatObjective

DENSE_RTOL = 1e-9  # float64, products vs. dense Hessian: only summation order differs
DENSE_ATOL = 1e-11
DENSE_MAX = 80  # full dense checks up to this many parameters (dict, multi_input); random directions above
LANCZOS_RTOL = 1e-5  # the callback's Lanczos tolerance below is 1e-7 (relative residual)


def _small_gpt(blocks: int = 2) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab=7, d=4, heads=2, blocks=blocks, context=5, dropout=0.2)


def _batches(dataset, sizes: tuple[int, ...]) -> list:
    out, start = [], 0
    for n in sizes:
        out.append(default_collate([dataset[i] for i in range(start, start + n)]))
        start += n
    return out


# Each case: a float64 module (in train mode), unequal batches, and the loss of one batch written out
# independently of the module's compute_loss / loss_fn: f(module, batch) on a functional module call.
def _case(name: str):
    if name == "gpt":
        module, data = _small_gpt(), gpt_data(8, vocab=7, context=5)

        def direct(call, batch):
            tokens, targets = batch
            logits = call(tokens)
            return F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))
    elif name == "lstm":
        torch.manual_seed(0)
        module, data = TinyLSTM(), make("lstm")[1].train

        def direct(call, batch):
            return F.cross_entropy(call(batch[0]), batch[1])
    elif name == "resnet":
        torch.manual_seed(0)
        module, data = TinyResNet(channels=2), make("resnet")[1].train
        with torch.no_grad():  # non-trivial running statistics
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)

        def direct(call, batch):
            return F.cross_entropy(call(batch[0]), batch[1])
    elif name == "dict":
        torch.manual_seed(0)
        module, data = DictModule(), DictDataset(8)

        def direct(call, batch):
            return F.cross_entropy(call(batch["x"], batch["extra"]), batch["label"])
    else:
        torch.manual_seed(0)
        module, data = MultiInput(), make("multi_input")[1].train

        def direct(call, batch):
            (x1, x2), y = batch
            return F.cross_entropy(call(x1, x2), y)
    module = module.double().train()
    batches = [_to_double(b) for b in _batches(data, (5, 3))]
    return module, batches, direct


def _to_double(batch):
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_double(v) for k, v in batch.items()}
    return type(batch)(_to_double(b) for b in batch)


def _dense_reference(module: nn.Module, batches: list, direct, directions: torch.Tensor | None = None) -> torch.Tensor:
    """Reverse-over-reverse dense Hessian (``_support.dense_hessian``) of the sample-weighted eval-mode loss
    (or its products with the columns of ``directions``); the module's modes are restored after."""

    def size(b):
        return next(iter(b.values())).shape[0] if isinstance(b, dict) else b[1].shape[0]

    loss, flat0 = flat_parameter_loss(module, batches, direct, size)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return dense_hessian(loss, flat0, directions)
    finally:
        for m, mode in modes:
            m.training = mode


@pytest.mark.parametrize("name", ["gpt", "lstm", "resnet", "dict", "multi_input"])
def test_products_match_dense_float64_hessian_on_zoo_models(name):
    module, batches, direct = _case(name)
    loss = resolve_loss_fn(module, None)
    assert isinstance(loss, ModuleLoss) == (name == "dict")
    op = HessianOperator(module, loss, batches)
    if op.numel <= DENSE_MAX:
        reference = _dense_reference(module, batches, direct)
        torch.testing.assert_close(op.dense(), reference, rtol=DENSE_RTOL, atol=DENSE_ATOL)
        block = reference[:, :3]
        directions = torch.eye(op.numel, dtype=torch.float64)[:, :3]
    else:  # GPT, LSTM: a block of random directions (a mismatch survives a random projection w.p. 1)
        directions = torch.randn(op.numel, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        block = _dense_reference(module, batches, direct, directions)
        torch.testing.assert_close(op @ directions, block, rtol=DENSE_RTOL, atol=DENSE_ATOL)
    assert all(m.training for m in module.modules())  # left in train mode (Dropout on)
    # forward-over-reverse, vmapped columns: through attention, the LSTM, compute_loss
    fresh = HessianOperator(module, loss, batches, linearize=False)
    torch.testing.assert_close(fresh @ directions, block, rtol=DENSE_RTOL, atol=DENSE_ATOL)


def test_hessian_spectrum_on_a_gpt_trained_with_dropout_matches_the_dense_hessian(tmp_path):
    """End to end: a float64 GPT with attention and MLP dropout trained by Lightning; the callback's top
    eigenvalue equals that of the dense eval-mode Hessian of its own measurement subset."""
    module = _small_gpt(blocks=1).double()
    data = gpt_data(12, vocab=7, context=5)
    loader = torch.utils.data.DataLoader(data, batch_size=4, generator=torch.Generator())
    cb = HessianSpectrum(top_k=2, tol=1e-7, num_batches=2)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=[cb])
    trainer.fit(module, train_dataloaders=loader)
    direct = _case("gpt")[2]
    eigenvalues = torch.linalg.eigvalsh(_dense_reference(module, cb._batches, direct)).flip(0)
    logged = torch.tensor([cb.history[-1]["hessian/eig_1"], cb.history[-1]["hessian/eig_2"]], dtype=torch.float64)
    torch.testing.assert_close(logged, eigenvalues[:2], rtol=LANCZOS_RTOL, atol=0)


def test_dict_batches_are_weighted_by_their_first_tensor_leaf_or_the_module_hook():
    module, batches, _ = _case("dict")
    module.eval()
    objective = FlatObjective(module, ModuleLoss(), batches)
    assert objective.sizes == [5, 3]
    merged = default_collate([DictDataset(8)[i] for i in range(8)])
    expected = F.cross_entropy(module(merged["x"].double(), merged["extra"].double()), merged["label"])
    torch.testing.assert_close(objective.loss(), expected.detach(), rtol=1e-12, atol=0)

    class Weighted(DictModule):
        def compute_batch_size(self, batch):
            return 2 * batch["label"].shape[0] + 1

    weighted = Weighted().double()
    weighted.load_state_dict(module.state_dict())
    op = HessianOperator(weighted, ModuleLoss(), batches)
    assert op._weights == pytest.approx([11 / 18, 7 / 18])


def test_a_single_dict_batch_is_refused_with_the_fix():
    module, batches, _ = _case("dict")
    with pytest.raises(TypeError, match="single dict; wrap it in a list"):
        HessianOperator(module, ModuleLoss(), batches[0])
    with pytest.raises(ValueError, match="define compute_loss"):
        HessianOperator(module, F.cross_entropy, batches)


def test_fisher_rao_and_sharpness_agree_between_compute_loss_and_pairs():
    """The dict module measured through compute_loss (per-sample forward-mode derivatives) and through an
    equivalent (inputs, targets) view with a loss_fn (one JVP and output gradients)."""
    module, batches, _ = _case("dict")
    module.eval()
    pairs = [((b["x"], b["extra"]), b["label"]) for b in batches]
    torch.testing.assert_close(fisher_rao_norm(module, ModuleLoss(), batches),
                               fisher_rao_norm(module, F.cross_entropy, pairs), rtol=1e-10, atol=0)
    torch.testing.assert_close(sam_sharpness(module, ModuleLoss(), batches, rho=0.1),
                               sam_sharpness(module, PairLoss(F.cross_entropy), pairs, rho=0.1), rtol=1e-10, atol=0)


class _ForcedFlash(nn.Module):
    """Attention that picks the fused flash kernel itself (overriding the measurement's choice)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 1, 4).unbind(2)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
        return out.transpose(1, 2).reshape(x.shape)


def test_an_op_without_double_backward_is_named_with_its_layer():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential())
    model.encoder.add_module("attn", _ForcedFlash())
    model.add_module("head", nn.Linear(4, 3))
    x, y = torch.randn(2, 5, 4), torch.randint(3, (2, 5))
    loss = PairLoss(lambda out, t: F.cross_entropy(out.reshape(-1, 3), t.reshape(-1)))
    op = HessianOperator(model, loss, [(x, y)])
    with pytest.raises(MissingDerivativeError, match=r"_scaled_dot_product_flash_attention_for_cpu_backward has "
                                                     r"no double-backward derivative.*encoder\.attn \(_ForcedFlash\)"):
        op @ torch.ones(op.numel)
    fresh = HessianOperator(model, loss, [(x, y)], linearize=False)
    with pytest.raises(MissingDerivativeError, match=r"forward-mode.*encoder\.attn") as info:
        fresh @ torch.ones(op.numel)
    assert info.value.layers == ["encoder.attn"]
    with pytest.raises(MissingDerivativeError, match=r"forward-mode.*encoder\.attn"):  # measures' forward mode
        fisher_rao_norm(model, loss, [(x, y)])


def test_measuring_selects_kernels_with_derivatives_and_restores_the_settings():
    module = _small_gpt()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with measuring(module):
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    with measuring(TinyLSTM()):  # recurrent layers: native kernels (oneDNN/cuDNN RNNs lack the derivatives)
        assert not torch.backends.mkldnn.enabled and not torch.backends.cudnn.enabled
    assert torch.backends.mkldnn.enabled and torch.backends.cudnn.enabled


def test_generalization_gap_on_token_level_outputs_ignores_padding():
    module = _small_gpt().eval()
    tokens, targets = gpt_data(6, vocab=7, context=5).tensors
    targets = targets.clone()
    targets[:, -1] = -100  # padding: left out of the loss (F.cross_entropy's default) and of the accuracy
    batches = [(tokens[:4], targets[:4]), (tokens[4:], targets[4:])]
    loss, acc = GeneralizationGap()._evaluate(module, resolve_loss_fn(module, None), batches)
    with torch.no_grad():
        logits = module(tokens)
    keep = targets != -100
    assert acc == pytest.approx(float((logits.argmax(-1)[keep] == targets[keep]).double().mean()), abs=1e-7)
    per_batch = [float(module.loss_fn(logits[s], targets[s])) for s in (slice(0, 4), slice(4, 6))]
    assert loss == pytest.approx((4 * per_batch[0] + 2 * per_batch[1]) / 6, rel=1e-6)


def _token_loss(out, targets, ignore_index=-100):
    return F.cross_entropy(out.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def test_generalization_gap_reads_the_ignore_index_of_a_partial_loss():
    import functools

    module = _small_gpt().eval()
    tokens, targets = gpt_data(6, vocab=7, context=5).tensors
    targets = targets.clone()
    targets[:, -1] = 0  # padding with token 0, which the loss skips: so must the accuracy
    loss_fn = functools.partial(_token_loss, ignore_index=0)
    _, acc = GeneralizationGap()._evaluate(module, loss_fn, [(tokens, targets)])
    with torch.no_grad():
        predicted = module(tokens).argmax(-1)
    keep = targets != 0
    assert acc == pytest.approx(float((predicted[keep] == targets[keep]).double().mean()), abs=1e-7)
    assert acc != pytest.approx(float((predicted == targets).double().mean()), abs=1e-7)


def test_generalization_gap_class_dimension_one_and_reasons():
    gap = GeneralizationGap()
    scores, labels = gap._class_scores(torch.randn(2, 5, 3), torch.randint(5, (2, 3)))  # (B, C, T)
    assert scores.shape == (6, 5) and labels.shape == (6,)
    assert "not integer class labels" in gap._class_scores(torch.randn(4, 1), torch.randn(4, 1))
    assert "not class scores" in gap._class_scores(torch.randn(4, 3), torch.randint(3, (5,)))


def test_generalization_gap_on_dict_batches_logs_the_loss_and_says_why_no_accuracy():
    module, batches, _ = _case("dict")
    module.eval()
    gap = GeneralizationGap()
    with pytest.warns(UserWarning, match="no accuracy for Weighted|no accuracy for DictModule.*dicts"):
        loss, acc = gap._evaluate(module, ModuleLoss(), batches)
    assert acc is None
    expected = FlatObjective(module, ModuleLoss(), batches).loss()
    assert loss == pytest.approx(float(expected), rel=1e-6)


def test_batch_sizes_leaves_and_samples_of_any_structure():
    from collections import namedtuple

    from lightning_optsurvey.curvature.objective import batch_size, first_tensor_leaf, split_samples

    x, y = torch.randn(4, 3), torch.arange(4)
    assert batch_size((x, y)) == 4 and batch_size(((x[:2], x[:2]), y[:2])) == 2
    nested = {"meta": {"lengths": torch.tensor(7)}, "ids": torch.zeros(5, 6, dtype=torch.long), "w": x}
    assert first_tensor_leaf(nested) is nested["ids"] and batch_size(nested) == 5  # 0-dim leaves skipped
    with pytest.raises(ValueError, match="compute_batch_size"):
        batch_size({"name": "no tensors"})
    Pair = namedtuple("Pair", "inputs targets")
    pieces = split_samples({"x": x, "pair": Pair(x, y), "scale": torch.tensor(2.0), "tag": "a"}, 4)
    assert len(pieces) == 4 and torch.equal(pieces[2]["pair"].targets, y[2:3])
    assert pieces[1]["scale"] is not None and pieces[3]["tag"] == "a" and pieces[0]["x"].shape == (1, 3)


def test_batch_loss_arguments_are_checked():
    from lightning_optsurvey.curvature import as_batch_loss

    with pytest.raises(TypeError, match="BatchLoss"):
        as_batch_loss(3)
    with pytest.raises(TypeError, match="method name"):
        ModuleLoss("not a name")
    plain = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="Linear has no method compute_loss"):
        HessianOperator(plain, ModuleLoss(), [{"x": torch.randn(3, 2)}])

    class BadSize(DictModule):
        def compute_batch_size(self, batch):
            return 0

    with pytest.raises(ValueError, match="compute_batch_size must return a positive integer, got 0"):
        HessianOperator(BadSize(), ModuleLoss(), [DictDataset(2)[0]])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", "lstm", "resnet"])
def test_full_dense_hessian_of_the_larger_zoo_models(name):
    """The default test checks these on random directions; here every column (400 for the GPT)."""
    module, batches, direct = _case(name)
    op = HessianOperator(module, resolve_loss_fn(module, None), batches)
    torch.testing.assert_close(op.dense(), _dense_reference(module, batches, direct), rtol=DENSE_RTOL,
                               atol=DENSE_ATOL)


class _HFStyleGPT(TinyGPT):
    """Hugging Face-style batches ``{"input_ids", "labels"}`` with padding labelled -100; the loss is the mean
    over real tokens, so a batch weighs its number of real tokens (``compute_batch_size``)."""

    def compute_loss(self, batch):
        logits = self(batch["input_ids"])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))

    def compute_batch_size(self, batch):
        return int((batch["labels"] != -100).sum())


def test_token_weighted_dict_batches_give_the_hessian_of_the_token_mean():
    torch.manual_seed(0)
    module = _HFStyleGPT(vocab=7, d=4, heads=2, blocks=1, context=5, dropout=0.1).double().train()
    tokens, labels = gpt_data(6, vocab=7, context=5).tensors
    labels = labels.clone()
    labels[0, 3:] = -100  # unequal padding: 3 + 5 real tokens in the first batch, 5 + 5 + 1 in the second
    labels[4, 1:] = -100
    batches = [{"input_ids": tokens[i:j], "labels": labels[i:j]} for i, j in ((0, 2), (2, 5))]
    op = HessianOperator(module, resolve_loss_fn(module, None), batches)
    assert op._weights == pytest.approx([8 / 19, 11 / 19])
    merged = {"input_ids": tokens[:5], "labels": labels[:5]}  # one batch: the token mean over all 19 tokens

    def direct(call, batch):
        logits = call(batch["input_ids"])
        return F.cross_entropy(logits.reshape(-1, 7), batch["labels"].reshape(-1))

    directions = torch.randn(op.numel, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    reference = _dense_reference(module, [merged], direct, directions)
    torch.testing.assert_close(op @ directions, reference, rtol=DENSE_RTOL, atol=DENSE_ATOL)


def test_m_sharpness_of_dict_batches_equals_that_of_the_pairs():
    """compute_loss on dict batches vs. a loss_fn on ((x, extra), label) pairs, and vs. one direct SAM step
    per group of two samples."""
    module, batches, _ = _case("dict")
    module.eval()
    batches = [_to_double(b) for b in _batches(DictDataset(8), (4, 4))]
    pairs = [((b["x"], b["extra"]), b["label"]) for b in batches]
    value = sam_sharpness(module, ModuleLoss(), batches, rho=0.1, m=2)
    torch.testing.assert_close(value, sam_sharpness(module, F.cross_entropy, pairs, rho=0.1, m=2), rtol=1e-10, atol=0)
    groups = [((x[i:i + 2], e[i:i + 2]), y[i:i + 2]) for (x, e), y in pairs for i in (0, 2)]
    direct = sum(sam_sharpness(module, F.cross_entropy, [g], rho=0.1) for g in groups) / len(groups)
    torch.testing.assert_close(value, direct, rtol=1e-12, atol=0)
