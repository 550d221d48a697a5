"""Tests of the artifact store: keys, round trips, verification, atomicity and concurrency."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import store as store_mod
from benchmarks.io import atomic_write_bytes, canonical_json, to_jsonable
from benchmarks.store import (
    ArtifactNotFoundError,
    ArtifactStore,
    CacheMismatchError,
    CorruptArtifactError,
    spec_key,
)

SPEC = {"setting": {"dataset": "digits2", "steps": 10, "lr": 1e-3}, "subset": 3, "seed": 1}


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "cache", provenance={"test": True})


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, [numel * itemsize] uint8."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _assert_tensors_bitwise_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)  # same names in the same order
    for name in a:
        assert b[name].dtype == a[name].dtype, name
        assert b[name].shape == a[name].shape, name
        assert torch.equal(_bits(b[name]), _bits(a[name])), name


def _tmp_dirs(store: ArtifactStore) -> list[Path]:
    return [p for p in store.root.rglob(".tmp-*")]


# ---- keys ------------------------------------------------------------------------------------


def test_key_is_sha256_of_hand_written_canonical_json():
    spec = {"b": 1, "a": [1.5, "x", None, True], "c": {"z": 0.1, "y": -2}}
    expected_text = '{"a":[1.5,"x",null,true],"b":1,"c":{"y":-2,"z":0.1}}'
    assert canonical_json(spec) == expected_text
    digest = hashlib.sha256(expected_text.encode()).hexdigest()[:16]
    assert spec_key("model", spec) == f"model-{digest}"
    assert re.fullmatch(r"model-[0-9a-f]{16}", spec_key("model", spec))


def test_key_stable_under_dict_order_and_equivalent_types(store):
    a = {"x": 1, "y": {"p": 0.5, "q": [1, 2]}, "path": "/tmp/a"}
    b = {"path": Path("/tmp/a"), "y": {"q": (1, 2), "p": 0.5}, "x": 1}
    c = {
        "y": {"q": np.array([1, 2]), "p": np.float64(0.5)},
        "x": torch.tensor(1),
        "path": "/tmp/a",
    }
    assert store.key("k", a) == store.key("k", b) == store.key("k", c)


def test_key_distinguishes_close_floats_and_int_vs_float(store):
    assert store.key("k", {"lr": 0.1}) != store.key("k", {"lr": 0.1000001})
    assert store.key("k", {"steps": 1}) != store.key("k", {"steps": 1.0})
    assert store.key("k", {"flag": True}) != store.key("k", {"flag": 1})
    assert store.key("k", SPEC) != store.key("other", SPEC)
    # float32 scalars are converted to the float they represent, not to 0.1.
    assert canonical_json({"v": np.float32(0.1)}) == '{"v":0.10000000149011612}'


def test_dataclass_spec_equals_its_fields_dict(store):
    @dataclasses.dataclass(frozen=True)
    class Inner:
        a: int
        b: tuple[int, ...]

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner
        lr: float

    spec = Outer(Inner(1, (2, 3)), 0.25)
    assert store.key("k", {"cfg": spec}) == store.key(
        "k", {"cfg": {"lr": 0.25, "inner": {"a": 1, "b": [2, 3]}}}
    )


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"x": float("nan")}, "NaN"),
        ({"x": [1.0, float("inf")]}, "NaN/inf"),
        ({"x": object()}, "unsupported type"),
        ({"x": {1: "a"}}, "keys must be str"),
        ({"x": torch.float32}, "unsupported type"),
        ({"x": np.array(["a"], dtype=object)}, "dtype object"),
    ],
)
def test_unsupported_spec_values_raise_type_error(store, bad, fragment):
    with pytest.raises(TypeError, match=re.escape(fragment)) as info:
        store.key("k", bad)
    assert "spec['x']" in str(info.value)


@pytest.mark.parametrize("kind", ["", "../x", "a/b", ".tmp", "-x", "x" * 65, "a b"])
def test_invalid_kind_raises(store, kind):
    with pytest.raises(ValueError, match="kind"):
        store.key(kind, SPEC)


# ---- round trips -----------------------------------------------------------------------------


def test_tensors_round_trip_bitwise(store):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    tensors = {
        "f32": torch.randn(3, 4, generator=g),
        "f64_nan": torch.tensor([1.0, float("nan"), -0.0, 1e-310], dtype=torch.float64),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
        "transposed": base.t(),  # non-contiguous view
        "shares_storage": base[1:],  # shares memory with "transposed"
    }
    path = store.save_tensors("scores", SPEC, tensors)
    assert path == store.path("scores", SPEC) and path.is_dir()
    assert (path / "tensors.safetensors").is_file() and (path / "spec.json").is_file()
    loaded = store.load_tensors("scores", SPEC)
    _assert_tensors_bitwise_equal(tensors, loaded)


def test_arrays_round_trip_bitwise_in_order(store):
    rng = np.random.default_rng(0)
    arrays = {
        "masks": rng.random((6, 10)) < 0.5,
        "values": np.array([0.1, np.nan, -0.0, np.inf], dtype=np.float64),
        "f32": rng.standard_normal((3, 2)).astype(np.float32),
        "fortran": np.asfortranarray(rng.integers(0, 100, (3, 4))),
        "zero_d": np.array(7, dtype=np.int16),
        "u8": np.arange(5, dtype=np.uint8),
    }
    store.save_arrays("groundtruth", SPEC, arrays)
    loaded = store.load_arrays("groundtruth", SPEC)
    assert list(loaded) == list(arrays)
    for name, a in arrays.items():
        b = loaded[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert b.tobytes(order="A") == a.tobytes(order="A"), name


def test_arrays_refuse_object_dtype_and_bad_names(store):
    with pytest.raises(TypeError, match="object dtype"):
        store.save_arrays("k", SPEC, {"x": np.array([{}, 1], dtype=object)})
    with pytest.raises(ValueError, match="array name"):
        store.save_arrays("k", SPEC, {"../evil": np.zeros(2)})
    assert not store.exists("k", SPEC)


def test_json_round_trip_exact_floats(store):
    payload = {
        "lds": [0.1, 1e-300, 2.0**-1074, -0.0, float("nan"), float("inf")],
        "nested": {"t": (1, 2), "s": "ü", "none": None, "np": np.int64(5)},
    }
    store.save_json("summary", SPEC, payload)
    loaded = store.load_json("summary", SPEC)
    assert loaded["nested"] == {"t": [1, 2], "s": "ü", "none": None, "np": 5}
    got = loaded["lds"]
    assert got[:4] == [0.1, 1e-300, 2.0**-1074, -0.0]
    assert str(got[3]) == "-0.0" and np.isnan(got[4]) and got[5] == float("inf")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)  # has buffers, including an int64 one
        self.head = nn.Linear(4, 4, bias=False)
        self.tied = self.head  # the same weight under two names


def test_state_dict_round_trip_into_fresh_module(store):
    torch.manual_seed(0)
    model = _Tiny()
    model.norm.running_mean.add_(torch.randn(2))
    model.norm.num_batches_tracked.add_(7)
    store.save_state_dict("base-model", SPEC, model)
    fresh = _Tiny()
    loaded = store.load_state_dict("base-model", SPEC, module=fresh)
    _assert_tensors_bitwise_equal(model.state_dict(), loaded)
    _assert_tensors_bitwise_equal(model.state_dict(), fresh.state_dict())


def test_load_generic_dispatches_on_stored_format(store):
    store.save_json("a", SPEC, {"v": 1})
    store.save_arrays("b", SPEC, {"v": np.arange(3)})
    assert store.load("a", SPEC) == {"v": 1}
    assert np.array_equal(store.load("b", SPEC)["v"], np.arange(3))


# ---- verification ----------------------------------------------------------------------------


def _edit_sidecar(path: Path, edit) -> None:
    sidecar_path = path / "spec.json"
    sidecar = json.loads(sidecar_path.read_text())
    edit(sidecar)
    sidecar_path.write_text(json.dumps(sidecar))


def test_mismatched_sidecar_is_refused_and_kept(store):
    path = store.save_tensors("scores", SPEC, {"x": torch.ones(2)})

    def edit(sidecar):
        sidecar["spec"]["subset"] = 4

    _edit_sidecar(path, edit)
    for call in (
        lambda: store.load_tensors("scores", SPEC),
        lambda: store.exists("scores", SPEC),
        lambda: store.get_or_compute("scores", SPEC, lambda: {"x": torch.zeros(2)}, fmt="tensors"),
        lambda: store.save_tensors("scores", SPEC, {"x": torch.ones(2)}),
    ):
        with pytest.raises(CacheMismatchError) as info:
            call()
        message = str(info.value)
        assert str(path) in message and "--cache-dir" in message and "subset" in message
    assert path.is_dir()  # nothing deleted automatically


def test_format_mismatch_is_refused(store):
    store.save_json("scores", SPEC, {"x": 1})
    with pytest.raises(CacheMismatchError, match="format 'json'"):
        store.load_tensors("scores", SPEC)
    with pytest.raises(CacheMismatchError, match="format 'json'"):
        store.get_or_compute("scores", SPEC, lambda: {"x": torch.ones(1)}, fmt="tensors")


def test_flipped_byte_in_payload_is_corrupt(store):
    path = store.save_tensors("scores", SPEC, {"x": torch.arange(100, dtype=torch.float32)})
    payload = path / "tensors.safetensors"
    data = bytearray(payload.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: safetensors itself would not notice
    payload.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError) as info:
        store.load_tensors("scores", SPEC)
    assert str(payload) in str(info.value) and "delete" in str(info.value)


def test_truncated_npy_and_missing_files_are_corrupt(store):
    path = store.save_arrays("gt", SPEC, {"a": np.arange(50.0), "b": np.ones(3)})
    (path / "a.npy").write_bytes((path / "a.npy").read_bytes()[:40])
    with pytest.raises(CorruptArtifactError, match="size"):
        store.load_arrays("gt", SPEC)
    (path / "a.npy").unlink()
    with pytest.raises(CorruptArtifactError, match="cannot read"):
        store.load_arrays("gt", SPEC)
    (path / "spec.json").unlink()
    with pytest.raises(CorruptArtifactError, match="sidecar"):
        store.exists("gt", SPEC)


def test_corrupt_payload_whose_checksum_matches_is_still_reported(store):
    # A sidecar rewritten to match garbage (e.g. by hand) still fails at parse time.
    path = store.save_json("summary", SPEC, {"x": 1})
    garbage = b"{not json"

    def edit(sidecar):
        sidecar["files"]["payload.json"] = {
            "bytes": len(garbage),
            "sha256": hashlib.sha256(garbage).hexdigest(),
        }

    _edit_sidecar(path, edit)
    (path / "payload.json").write_bytes(garbage)
    with pytest.raises(CorruptArtifactError, match="cannot parse JSON"):
        store.load_json("summary", SPEC)


def test_missing_entry_raises_not_found(store):
    with pytest.raises(ArtifactNotFoundError, match="get_or_compute"):
        store.load_tensors("scores", SPEC)


# ---- atomicity -------------------------------------------------------------------------------


def _failing_on_call(monkeypatch, n_fail: int, exc: BaseException):
    original = store_mod.write_new_file
    calls = {"n": 0}

    def write(path, data):
        calls["n"] += 1
        if calls["n"] == n_fail:
            raise exc
        original(path, data)

    monkeypatch.setattr(store_mod, "write_new_file", write)
    return calls


def test_crash_mid_write_leaves_no_entry_and_retry_succeeds(store, monkeypatch):
    arrays = {"a": np.arange(3), "b": np.ones(4), "c": np.zeros(2)}
    calls = _failing_on_call(monkeypatch, 2, RuntimeError("disk full"))
    with pytest.raises(RuntimeError, match="disk full"):
        store.save_arrays("gt", SPEC, arrays)
    assert calls["n"] == 2  # one payload file was written before the failure
    assert not store.path("gt", SPEC).exists()
    assert not store.exists("gt", SPEC)
    assert _tmp_dirs(store) == []  # an exception cleans up its temporary directory
    monkeypatch.undo()
    store.save_arrays("gt", SPEC, arrays)
    assert np.array_equal(store.load_arrays("gt", SPEC)["b"], np.ones(4))


def test_killed_writer_leaves_only_an_ignored_tmp_dir(store, monkeypatch):
    # A kill gives no chance to clean up: disable the cleanup to simulate it.
    _failing_on_call(monkeypatch, 3, KeyboardInterrupt())
    monkeypatch.setattr(store_mod.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        store.save_arrays("gt", SPEC, {"a": np.arange(3), "b": np.ones(4)})  # dies at sidecar
    monkeypatch.undo()
    (stale,) = _tmp_dirs(store)
    assert (stale / "a.npy").is_file() and not (stale / "spec.json").exists()
    assert not store.exists("gt", SPEC) and store.list("gt") == []

    calls = []
    out = store.get_or_compute(
        "gt", SPEC, lambda: calls.append(1) or {"a": np.arange(3)}, fmt="arrays"
    )
    assert calls == [1] and np.array_equal(out["a"], np.arange(3))
    assert store.cleanup_tmp() == 0  # too fresh to be called stale by default
    assert store.cleanup_tmp(min_age_s=0) == 1
    assert _tmp_dirs(store) == [] and store.exists("gt", SPEC)


def test_atomic_write_bytes_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "result.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


# ---- concurrency -----------------------------------------------------------------------------


def _race_at_rename(monkeypatch, n_threads: int = 2) -> None:
    """Make every writer finish its temporary directory before any of them renames it."""
    barrier = threading.Barrier(n_threads, timeout=20)
    original = store_mod.fsync_dir

    def fsync_dir(path):
        original(path)
        if Path(path).name.startswith(".tmp-"):
            barrier.wait()

    monkeypatch.setattr(store_mod, "fsync_dir", fsync_dir)


def _run_threads(fns):
    results, errors = [None] * len(fns), []

    def run(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def test_concurrent_same_key_writes_both_succeed_with_one_entry(store, monkeypatch):
    _race_at_rename(monkeypatch)
    tensors = {"x": torch.arange(6.0).reshape(2, 3)}
    paths = _run_threads([lambda: store.save_tensors("scores", SPEC, tensors)] * 2)
    assert paths[0] == paths[1] == store.path("scores", SPEC)
    assert [e.key for e in store.list("scores")] == [store.key("scores", SPEC)]
    assert _tmp_dirs(store) == []
    _assert_tensors_bitwise_equal(tensors, store.load_tensors("scores", SPEC))


def test_concurrent_get_or_compute_all_return_the_stored_winner(store, monkeypatch):
    _race_at_rename(monkeypatch)
    # Two writers compute different values (think: non-deterministic GPU kernels).
    outs = _run_threads(
        [
            lambda v=v: store.get_or_compute(
                "scores", SPEC, lambda: {"x": torch.full((3,), float(v))}, fmt="tensors"
            )
            for v in (1, 2)
        ]
    )
    stored = store.load_tensors("scores", SPEC)["x"]
    assert stored[0].item() in (1.0, 2.0)
    for out in outs:
        assert torch.equal(out["x"], stored)


# ---- get_or_compute and maintenance ----------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, make",
    [
        ("tensors", lambda: {"x": torch.randn(3, generator=torch.Generator().manual_seed(1))}),
        ("arrays", lambda: {"x": np.random.default_rng(1).random(3)}),
        ("json", lambda: {"x": [0.1, 0.2]}),
        ("state_dict", lambda: nn.Linear(2, 2)),
    ],
)
def test_get_or_compute_computes_once(store, fmt, make):
    calls = []

    def compute():
        calls.append(1)
        return make()

    first = store.get_or_compute("thing", SPEC, compute, fmt=fmt)
    second = store.get_or_compute("thing", SPEC, compute, fmt=fmt)
    assert calls == [1]
    assert json.dumps(to_jsonable(first, nonfinite="keep")) == json.dumps(
        to_jsonable(second, nonfinite="keep")
    )
    other = store.get_or_compute("thing", {**SPEC, "seed": 2}, compute, fmt=fmt)
    assert calls == [1, 1] and other is not None


def test_get_or_compute_rejects_unknown_format(store):
    with pytest.raises(ValueError, match="unknown artifact format"):
        store.get_or_compute("thing", SPEC, dict, fmt="pickle")


def test_list_delete_exists_kinds(store):
    specs = [{"subset": i} for i in range(3)]
    for spec in specs:
        store.save_json("gt", spec, spec)
    entries = store.list("gt")
    assert sorted(e.key for e in entries) == sorted(store.key("gt", s) for s in specs)
    assert sorted(e.spec["subset"] for e in entries) == [0, 1, 2]
    assert {e.format for e in entries} == {"json"} and all(e.created for e in entries)
    assert store.kinds() == ["gt"] and store.list("absent") == []
    assert store.delete("gt", specs[1]) is True
    assert store.delete("gt", specs[1]) is False
    assert not store.exists("gt", specs[1]) and store.exists("gt", specs[0])
    assert len(store.list("gt")) == 2 and _tmp_dirs(store) == []


def test_sidecar_records_spec_format_files_and_provenance(tmp_path):
    store = ArtifactStore(tmp_path)  # default provenance: collected once on the first write
    path = store.save_tensors("scores", SPEC, {"x": torch.ones(3)})
    sidecar = json.loads((path / "spec.json").read_text())
    assert sidecar["kind"] == "scores" and sidecar["key"] == path.name
    assert sidecar["format"] == "tensors" and sidecar["spec"] == SPEC
    data = (path / "tensors.safetensors").read_bytes()
    assert sidecar["files"]["tensors.safetensors"] == {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert {"git_commit", "packages", "hostname"} <= set(sidecar["provenance"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", sidecar["created"])


def test_store_provides_what_methods_may_call():
    """methods/ gets the store through MethodContext.cache (Protocol ArtifactCache)."""
    from methods.context import ArtifactCache

    for name, member in vars(ArtifactCache).items():
        if name.startswith("_") or not callable(member):
            continue
        expected = list(inspect.signature(member).parameters)
        actual = list(inspect.signature(getattr(ArtifactStore, name)).parameters)
        assert actual[: len(expected)] == expected, name
    for name in ("get_or_compute", "exists", "save_tensors", "load_tensors", "work_dir"):
        assert callable(getattr(ArtifactStore, name))


def test_work_dir_keeps_the_trak_layout_and_refuses_bad_keys(store):
    path = store.work_dir("trak", "0123456789abcdef0123")
    assert path == store.root / "_work" / "trak" / "0123456789abcdef0123" and path.is_dir()
    (path / "features.mmap").write_bytes(b"x")
    assert store.work_dir("trak", "0123456789abcdef0123") == path  # kept, not emptied
    assert (path / "features.mmap").read_bytes() == b"x"
    assert store.kinds() == [] and store.cleanup_tmp(min_age_s=0) == 0  # not an entry
    for bad in ("../escape", "", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="work directory key"):
            store.work_dir("trak", bad)
