import torch

from moqae.experts import Expert, parse_experts
from moqae.quantizer import quantize_groups, quantize_keys, quantize_values, unit_storage_bits
from moqae.selection import mix, unit_value


def test_selection_vectors():
    for seq_id, seed, z, u in [(0, 0, 0xE220A8397B1DCDAF, 0.88331080821364272), (1, 0, 0x910A2DEC89025CC1, 0.56656157517228101),
                               (12345, 7, 0x9742442705B71595, 0.59085489227956278),
                               (1000000, 42, 0x62C089A91ABBFEF6, 0.38575039270902778)]:
        assert mix(seq_id, seed) == z
        assert unit_value(seq_id, seed) == u


def test_eight_bit_error_bound():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 96, 16) * 3
    for quantize in (lambda t: quantize_keys(t, 8, 32), lambda t: quantize_values(t, 8, 32, 16)):
        error = (quantize(x) - x).abs()
        # Half a step of the widest group, plus binary16 rounding of its minimum and scale.
        assert error.max() <= (x.max() - x.min()) / 255 / 2 * 1.01 + 1e-2


def test_keys_are_grouped_per_channel_inside_a_chunk():
    torch.manual_seed(1)
    x = torch.randn(1, 64, 8)
    changed = x.clone()
    changed[0, 40, 3] += 100          # chunk 1, channel 3
    delta = (quantize_keys(changed, 4, 32) - quantize_keys(x, 4, 32)).abs()
    touched = (delta > 0).nonzero()
    assert set(touched[:, 2].tolist()) == {3}
    assert touched[:, 1].min() >= 32 and touched[:, 1].max() < 64


def test_values_are_grouped_per_token():
    torch.manual_seed(2)
    x = torch.randn(1, 64, 8)
    changed = x.clone()
    changed[0, 5, 6] += 100           # token 5, second group of 4 channels
    delta = (quantize_values(changed, 2, 32, value_group=4) - quantize_values(x, 2, 32, value_group=4)).abs()
    touched = (delta > 0).nonzero()
    assert set(touched[:, 1].tolist()) == {5}
    assert set(touched[:, 2].tolist()) <= {4, 5, 6, 7}


def test_fp16_passthrough_and_tail():
    x = torch.randn(2, 70, 8)
    assert torch.equal(quantize_keys(x, 16, 32), x.half().float())
    assert torch.equal(quantize_values(x, 16, 32, 8), x.half().float())
    assert torch.equal(quantize_keys(x, 2, 32)[:, 64:], x[:, 64:].half().float())   # tail tokens are never quantized


def test_constant_groups():
    x = torch.full((1, 32, 4), 0.3)
    assert torch.equal(quantize_keys(x, 2, 32), x.half().float())
    assert torch.equal(quantize_groups(torch.tensor([[1.5, 1.5, 1.5]]), 3, dim=-1), torch.tensor([[1.5, 1.5, 1.5]]))


def test_storage_bits_and_experts():
    experts = parse_experts("fp16,int8,int4,k4v2,int2")
    assert [(e.key_bits, e.value_bits) for e in experts] == [(16, 16), (8, 8), (4, 4), (4, 2), (2, 2)]
    assert unit_storage_bits(Expert("fp16", 16, 16), 32, 128, 128) == 32 * 128 * 32
    assert unit_storage_bits(Expert("int4", 4, 4), 32, 128, 128) == 32 * 128 * 8 + 32 * 128 + 32 * 32
