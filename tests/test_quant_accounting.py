"""Byte accounting of the weight formats (``dgemma.quant.accounting``): every checkpoint tensor counted once,
parts that add up, a hand count on the tiny preset, and ``dgemma info`` reporting the same figures."""

import json

import pytest

from dgemma.bench.presets import PRESETS, preset_config
from dgemma.loading import meta_model
from dgemma.quant import accounting
from dgemma.quant.accounting import PARTS, bytes_by_part, total_bytes, weight_tensors

FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")


@pytest.mark.parametrize("preset", ["tiny", "small", "26b-a4b"])
def test_the_tensor_list_is_the_models_state_dict(preset):
    cfg = preset_config(preset)
    state = [(name, tuple(t.shape)) for name, t in meta_model(cfg).state_dict().items()]
    assert [(t.name, t.shape) for t in weight_tensors(cfg)] == state
    assert {t.part for t in weight_tensors(cfg)} == set(PARTS)


@pytest.mark.parametrize("embedding", ["bfloat16", "int8"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_parts_sum_to_the_total(fmt, embedding):
    cfg = preset_config("26b-a4b")
    parts = bytes_by_part(cfg, fmt, embedding)
    assert list(parts) == list(PARTS) and all(n > 0 for n in parts.values())
    assert sum(parts.values()) == total_bytes(cfg, fmt, embedding)


def test_float_formats_are_every_element_at_its_width():
    cfg = preset_config("small")
    n = sum(t.numel() for t in meta_model(cfg).state_dict().values())
    assert total_bytes(cfg, "float32") == 4 * n and total_bytes(cfg, "bfloat16") == 2 * n


def test_tiny_preset_by_hand():
    """tiny: vocab 512, d 64, dense 128, 4 experts of width 32, 4 heads; layers S F S F (sliding: 2 KV heads
    of 16, full: 1 KV head of 32, no V projection). Scales bf16 (2 B), int4 groups of 64."""
    cfg = preset_config("tiny")
    d, v, dense, e, moe = 64, 512, 128, 4, 32

    def int8(rows, cols):
        return rows * cols + 2 * rows

    def int4(rows, cols):
        return rows * (cols // 2) + rows * -(-cols // 64) * 2

    # (rows, cols) of every quantised matrix, per part
    sliding = [(64, d), (32, d), (32, d), (d, 64)]  # q: 4 heads x 16, k and v: 2 x 16, o
    full = [(128, d), (32, d), (d, 128)]  # q: 4 x 32, k: 1 x 32, o
    mats = {"attention": 2 * sliding + 2 * full,
            "dense_mlp": 4 * [(dense, d), (dense, d), (d, dense)],
            "self_conditioning": [(dense, d), (dense, d), (d, dense)],
            "experts": 4 * [(e * 2 * moe, d), (e * d, moe)]}  # each expert's rows on their own
    kept = {"router": 4 * (e * d + d + e),
            "norms_scalars": 4 * (7 * d + 2) + 2 * (2 * 16) + 2 * (2 * 32) + 2 * d}  # layer norms + scalars,
    # q/k norms (sliding 16, full 32), final norm and the self-conditioning pre-norm
    assert kept["norms_scalars"] == 2120
    for fmt, f in (("int8", int8), ("int4", int4)):
        want = {part: sum(f(r, c) for r, c in m) for part, m in mats.items()}
        want.update({"embedding": 2 * v * d, **{k: 2 * n for k, n in kept.items()}})
        assert bytes_by_part(cfg, fmt) == {p: want[p] for p in PARTS}
        assert bytes_by_part(cfg, fmt, embedding="int8")["embedding"] == int8(v, d)
    # the experts' down projection has 32 inputs: one (short) int4 group per row
    assert bytes_by_part(cfg, "int4")["experts"] == 4 * (256 * 32 + 256 * 2 + 256 * 16 + 256 * 2)
    assert total_bytes(cfg, "int4") == 223536 and total_bytes(cfg, "int8") == 363952


def test_the_released_size_fits_the_int4_target():
    cfg = preset_config("26b-a4b")
    assert total_bytes(cfg, "int4") == 14_515_729_528 <= 16e9
    assert total_bytes(cfg, "int8") == 26_034_248_568
    assert total_bytes(cfg, "bfloat16") == 50_501_973_624


def test_unknown_formats_are_refused():
    cfg = preset_config("tiny")
    with pytest.raises(ValueError, match="int3"):
        total_bytes(cfg, "int3")
    with pytest.raises(ValueError, match="embedding"):
        total_bytes(cfg, "int4", embedding="int4")


def test_info_reports_the_accounting(tmp_path, capsys):
    from dgemma.cli import main

    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"]()))
    cfg = preset_config("tiny")

    def info(*args):
        assert main(["info", str(tmp_path), *args]) == 0
        return capsys.readouterr().out

    report = json.loads(info("--json", "--quant-embedding", "int8"))
    for fmt in accounting.FORMATS:
        assert report["bytes"][fmt] == total_bytes(cfg, fmt, "int8")
        assert report["bytes_by_part"][fmt] == bytes_by_part(cfg, fmt, "int8")
    assert report["quantization"]["embedding"] == "int8"
    text = info("--quant", "int4")
    for part, n in bytes_by_part(cfg, "int4").items():
        assert f"{n:,} B" in next(line for line in text.splitlines() if line.startswith(f"  {part} "))
    assert f"{total_bytes(cfg, 'int4'):,} B" in text
