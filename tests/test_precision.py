"""Mixed precision: the ``precision`` setting, its "auto" rule, and bf16 training end to end."""
from __future__ import annotations

import pytest
import torch

from ptls_meles.config import MeLESConfig, parse_settings
from ptls_meles.nn.seq_encoder import ConvSeqEncoder, RnnSeqEncoder
from ptls_meles.train import lightning_precision


def test_precision_setting_is_checked_and_the_paper_preset_pins_float32():
    with pytest.raises(ValueError, match="precision"):
        MeLESConfig(precision="fp16")
    assert MeLESConfig(preset="paper").precision == "32"
    assert MeLESConfig(preset="paper", precision="bf16").precision == "bf16"
    # on the command line (--set, --define) a text setting stays text: precision=32 is "32", not 32
    assert parse_settings(["precision=32", "hidden_size=8", "pooling=last,mean"]) == {
        "precision": "32", "hidden_size": 8, "pooling": "last,mean"}
    # a yes/no setting reads the shell's words too; other words still reach the config's check
    assert parse_settings(["aux_relative=true", "hidden_size=8"]) == {"aux_relative": True, "hidden_size": 8}
    assert parse_settings(["aux_relative=False"]) == {"aux_relative": False}
    with pytest.raises(ValueError, match="aux_relative"):
        MeLESConfig.from_dict(parse_settings(["aux_relative=maybe"]))


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert lightning_precision("auto", "cpu") == ("bf16-mixed" if native else "32-true")
    assert lightning_precision("32", "cpu") == "32-true"  # an explicit setting wins either way
    assert lightning_precision("bf16", "cpu") == "bf16-mixed"


@pytest.mark.parametrize("encoder", ["conv", "gru"])
def test_length_bucketed_encoders_run_under_bf16_autocast(encoder):
    # 160 rows make 2 length groups; their pooled states are bfloat16 under autocast and used
    # to fail when copied into a float32 output ("Index put requires the source and destination dtypes match")
    torch.manual_seed(0)
    enc = ConvSeqEncoder(6, 8) if encoder == "conv" else RnnSeqEncoder(6, 8, pooling="last,mean")
    x = torch.randn(160, 12, 6)
    lengths = torch.randint(1, 13, (160,))
    exact = enc(x, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled, seq = enc(x, lengths, return_sequence=True)
    assert pooled.shape == exact.shape and seq.shape == (160, 12, 8)
    assert torch.allclose(pooled.float(), exact, atol=0.1, rtol=0.05)  # the same states, in 8 mantissa bits


def test_bf16_training_keeps_the_loss_in_float32_and_embeds_in_float32(tmp_path):
    from conftest import events_frame
    from ptls_meles.embed import embed_frame
    from ptls_meles.prepare import prepare
    from ptls_meles.schema import EventSchema
    from ptls_meles.train import MeLESModule, fit

    tx = events_frame(n_clients=40, max_len=30, seed=2)
    store, _ = prepare(tx, EventSchema("client", "day", ["mcc"], ["amount"], time_format="number"), show_progress=False)
    config = MeLESConfig(hidden_size=8, batch_size=8, max_epochs=2, num_workers=0, val_fraction=0.25, cnt_min=2,
                         cnt_max=10, patience=None, precision="bf16", projection_head=4)
    seen: dict[str, torch.dtype] = {}
    original = MeLESModule._metric_loss

    def spy(self, emb, labels):
        seen["metric space"] = emb.dtype
        loss = original(self, emb, labels)
        seen["loss"] = loss.dtype
        return loss

    MeLESModule._metric_loss = spy
    try:
        module = fit(store, config, out_dir=tmp_path, show_progress=False)
    finally:
        MeLESModule._metric_loss = original
    assert seen == {"metric space": torch.float32, "loss": torch.float32}
    assert all(p.dtype == torch.float32 for p in module.parameters())  # float32 master weights
    frame = embed_frame(module.embedder, store, show_progress=False)
    values = frame.drop(columns=frame.columns[0]).to_numpy()
    assert values.dtype == "float32" and len(frame) == store.n_clients and values.std() > 0
