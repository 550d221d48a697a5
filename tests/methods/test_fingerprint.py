"""The one tensor fingerprint of methods' cache keys keeps the values of the two it replaced."""

from __future__ import annotations

import pytest
import torch

from methods.fingerprint import tensor_fingerprint

# Digests computed with the former methods/kfac.py and methods/trak.py ``_fingerprint`` (before
# they became ``tensor_fingerprint``): cache keys hold them, so they must never change.
A = torch.arange(12, dtype=torch.float32).reshape(3, 4)
B = torch.tensor([[1, -2], [3, 4]], dtype=torch.int64).t()  # not contiguous
C = torch.tensor(2.5, dtype=torch.float64)  # 0-dim

KFAC_DIGESTS = {  # kfac's _fingerprint(*tensors)
    "a,b": "90840fcba7bda3fa3fd461827b0421f7373a954cd2d858855a3de7ec32b706e3",
    "a": "9ee58c5a059f68e5f3eaeabf72c843c7808e4c8e796ca11ba7279e6a13598ec5",
    "c": "bd1eb7143c27e136a065d0b4802326d72413ac4751e927f936498e3183dae0a6",
}
TRAK_DIGESTS = {  # trak's _fingerprint(tensor or mapping)
    "a": "fc7c23948799c23ba2154c5092fd6d7564fa2e32c27e4aece557fa33e9eef8c6",
    "{w: a, b: b}": "11e03a1972405112dbc3b973cc1e81029ff68638f9e01a4dc45750ae03e79922",
    "c": "1cbb66609923debe16854c513506e7eec33b5a124f57cf2307790752179e5700",
}


def test_kfac_style_digests_are_unchanged():
    assert tensor_fingerprint([A, B], named=False) == KFAC_DIGESTS["a,b"]
    assert tensor_fingerprint([A], named=False) == KFAC_DIGESTS["a"]
    assert tensor_fingerprint(A, named=False) == KFAC_DIGESTS["a"]
    assert tensor_fingerprint([C], named=False) == KFAC_DIGESTS["c"]


def test_trak_style_digests_are_unchanged():
    assert tensor_fingerprint(A, named=True) == TRAK_DIGESTS["a"]
    assert tensor_fingerprint({"w": A, "b": B}, named=True) == TRAK_DIGESTS["{w: a, b: b}"]
    assert tensor_fingerprint(C, named=True) == TRAK_DIGESTS["c"]


def test_fingerprint_sees_values_shapes_dtypes_and_devices_alike():
    assert tensor_fingerprint(A, named=True) != tensor_fingerprint(A + 1, named=True)
    assert tensor_fingerprint(A, named=True) != tensor_fingerprint(A.reshape(4, 3), named=True)
    assert tensor_fingerprint([A], named=False) != tensor_fingerprint([A.double()], named=False)
    grad = A.clone().requires_grad_(True)
    assert tensor_fingerprint(grad, named=True) == TRAK_DIGESTS["a"]
    with pytest.raises(TypeError, match="named=True"):
        tensor_fingerprint({"w": A}, named=False)
