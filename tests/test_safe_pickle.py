"""The restricted unpickler: data loads, code never runs."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from scforge.errors import InputDataError, UnsafeFileError
from scforge.safe_pickle import safe_load_pickle


class _ShellPayload:
    """Unpickling this runs ``touch MARKER`` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _OpenPayload:
    """Unpickling this creates MARKER through builtins.open (no shell needed)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _EvalPayload:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


class _PlainObject:
    def __init__(self) -> None:
        self.x = 1


DATA = {
    "str": "ENSG00000141510",
    "ints": [0, 1, -5, 2**70],
    "floats": (1.5, float("inf")),
    "set": {1, 2, 3},
    "frozen": frozenset({"a", "b"}),
    "bytes": b"\x00\xffabc",
    "bytearray": bytearray(b"xyz"),
    "none": None,
    "bools": [True, False],
    "complex": 1 + 2j,
    "ordered": OrderedDict([("b", 1), ("a", 2)]),
    "nested": {"k": [{"deep": (1, "x")}]},
}


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_python_data_round_trips(protocol: int) -> None:
    loaded = safe_load_pickle(pickle.dumps(DATA, protocol=protocol))
    assert loaded == DATA
    assert type(loaded["ordered"]) is OrderedDict
    assert list(loaded["ordered"]) == ["b", "a"]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_scalars_and_arrays_load(protocol: int) -> None:
    obj = {
        "id": np.int16(7),
        "median": np.float64(2.5),
        "arr": np.arange(6, dtype=np.float32).reshape(2, 3),
        "strs": np.array(["a", "bb"], dtype=object),
        "fortran": np.asfortranarray(np.arange(4, dtype=np.int64).reshape(2, 2)),
    }
    loaded = safe_load_pickle(pickle.dumps(obj, protocol=protocol))
    assert loaded["id"] == 7 and loaded["id"].dtype == np.int16
    assert loaded["median"] == 2.5 and isinstance(loaded["median"], np.float64)
    np.testing.assert_array_equal(loaded["arr"], obj["arr"])
    assert loaded["arr"].dtype == np.float32
    assert loaded["strs"].tolist() == ["a", "bb"]
    np.testing.assert_array_equal(loaded["fortran"], obj["fortran"])


def test_path_and_file_object_inputs(tmp_path: Path) -> None:
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    assert safe_load_pickle(path) == {"a": 1}
    assert safe_load_pickle(str(path)) == {"a": 1}
    with open(path, "rb") as f:
        assert safe_load_pickle(f) == {"a": 1}
    assert safe_load_pickle(io.BytesIO(pickle.dumps([1, 2]))) == [1, 2]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_os_system_payload_is_refused_and_never_runs(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"genes": [_ShellPayload(marker)]}, protocol=protocol))
    with pytest.raises(UnsafeFileError) as info:
        safe_load_pickle(path)
    message = str(info.value)
    assert "system" in message  # posix.system / nt.system: the forbidden global is named
    assert str(path) in message  # and so is the file
    assert not marker.exists()


def test_open_payload_is_live_with_plain_pickle_but_not_here(tmp_path: Path) -> None:
    payload = pickle.dumps(_OpenPayload(tmp_path / "created_by_pickle"))
    # sanity: the payload really executes with the standard unpickler
    f = pickle.loads(payload)
    f.close()
    assert (tmp_path / "created_by_pickle").exists()

    marker = tmp_path / "must_not_exist"
    with pytest.raises(UnsafeFileError, match=r"'io\.open'"):
        safe_load_pickle(pickle.dumps(_OpenPayload(marker)))
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, forbidden",
    [
        (_EvalPayload(), "builtins.eval"),
        (_PlainObject(), "test_safe_pickle._PlainObject"),  # any class of the caller
        (np.ma.masked_array([1, 2], mask=[0, 1]), "numpy.ma"),
        (Path("/tmp"), "pathlib"),
    ],
)
def test_other_globals_are_refused(obj: object, forbidden: str) -> None:
    with pytest.raises(UnsafeFileError) as info:
        safe_load_pickle(pickle.dumps(obj, protocol=4))
    assert forbidden in str(info.value)
    assert "the pickle bytes" in str(info.value)


def test_python2_style_builtin_globals_are_refused() -> None:
    # protocol 2 names the module __builtin__ (Python 2 compatibility)
    with pytest.raises(UnsafeFileError, match=r"__builtin__\.eval"):
        safe_load_pickle(pickle.dumps(_EvalPayload(), protocol=2))


def test_subprocess_global_in_a_hand_written_pickle_is_refused() -> None:
    # protocol-0 GLOBAL opcode written by hand: subprocess.Popen(['true'])
    payload = b"csubprocess\nPopen\n((lp0\nVtrue\np1\natp2\nRp3\n."
    with pytest.raises(UnsafeFileError, match="subprocess.Popen"):
        safe_load_pickle(payload)


def test_torch_like_zip_and_persistent_ids_are_refused(tmp_path: Path) -> None:
    zpath = tmp_path / "model.pt"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeFileError, match="zip"):
        safe_load_pickle(zpath)

    buf = io.BytesIO()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage0" if obj == "tensor" else None

    P(buf, protocol=2).dump({"w": "tensor"})
    with pytest.raises(UnsafeFileError, match="persistent"):
        safe_load_pickle(buf.getvalue())


def test_unreadable_input_gives_input_data_error(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="does not exist"):
        safe_load_pickle(tmp_path / "missing.pkl")
    with pytest.raises(InputDataError, match="not a valid data pickle"):
        safe_load_pickle(b"this is not a pickle")
    truncated = pickle.dumps(list(range(100)))[:-10]
    with pytest.raises(InputDataError, match="truncated"):
        safe_load_pickle(truncated)
    with pytest.raises(InputDataError, match="expects a path"):
        safe_load_pickle(12345)  # type: ignore[arg-type]


def test_real_geneformer_dictionary_loads(shared_data: Path) -> None:
    token_dict = safe_load_pickle(shared_data / "genes" / "geneformer_v1" / "token_dictionary.pkl")
    assert isinstance(token_dict, dict) and len(token_dict) == 25_426
    assert token_dict["<pad>"] == 0 and token_dict["<mask>"] == 1
    assert isinstance(token_dict["ENSG00000000003"], np.int16)
