"""Bound what a checkpoint's pickle may build, before torch's weights-only unpickler builds it.

`torch.load(weights_only=True)` calls only allowlisted functions, but some of them turn a few
bytes into gigabytes or hours: `bytearray(300_000_000)` from a 4-byte integer,
`torch.Size(bytearray(...))` (a tuple of 3·10⁸ ints: 6 GB in 12 s), `set(view)` over a
stride-0 tensor view of 10¹² elements, one memoised tuple copied thousands of times, `punycode`
(quadratic) encoding. This walks the opcodes with `pickletools.genops` (which runs nothing) over a
model of the unpickler's stack (ints, texts, tuples, storages, tensors, and the functions applied
to them) and refuses the file, with a one-line `CheckpointError`, when:

- a call is not one a saved state dict needs (torch's allowlist also has tensor and storage
  constructors, device, nested and wrapper-subclass tensor rebuilds);
- a call would iterate over a tensor or storage, encode text with a non-linear codec, or build
  more than `CALL_BUDGET` elements plus one per byte of pickle read so far;
- a tensor is rebuilt from something that is not stored data (torch: AttributeError), or is
  sparse (the loader refuses those anyway; torch would keep them after a failed load);
- (legacy files) storages declare more elements than the file has bytes: torch allocates them
  before it reads a byte of their data.

Cost: one pass over the opcodes, a few microseconds each; the tensors' data is not read.
"""

from __future__ import annotations

import io
import math
import pickletools
import warnings
from dataclasses import dataclass

from models.errors import CheckpointError, one_line

__all__ = ["CALL_BUDGET", "DAMAGED", "check_pickles", "refused_call"]

CALL_BUDGET = 1 << 23
"""Elements (or bytes) all calls of a file's pickles may build, beyond one per byte of pickle."""

DAMAGED = (
    "refused: the checkpoint's pickle is damaged or does more than build tensors; nothing was run"
)
_STORAGE_SIZE = "checkpoint is damaged: its storages declare a size larger than the whole file"

_VIEWS = {  # (storage, offset, size, stride, ...) -> a view of stored data, nothing copied
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
}
_QTENSOR = "torch._utils._rebuild_qtensor"  # the same, but allocates `size` elements first
_TENSORS = {  # wrap or describe a tensor, allocate nothing
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch.nn.parameter.Parameter",
}
# torch keeps sparse tensors in a module-level list until a load ends well: one that fails after
# them leaves them for the next load to check (an invalid one then fails a valid file)
_SPARSE = "torch._utils._rebuild_sparse_tensor"
_FROM_TYPE = "torch._tensor._rebuild_from_type_v2"  # (func, type, args, state): func(*args)
_COPIES = {  # build as many elements as their first argument holds
    "torch.Size",
    "builtins.set",
    "builtins.bytearray",
    "collections.Counter",
    "collections.OrderedDict",
    "_codecs.encode",
}
_SMALL = {"builtins.complex", "torch.device", "torch.serialization._get_layout"}
_LINEAR_CODECS = {"latin1", "latin-1", "latin_1", "iso-8859-1", "utf-8", "utf8", "utf_8", "ascii"}
_MODULES = {"__builtin__": "builtins"}  # protocol-2 pickles name builtins as Python 2 did
_INTS = {"BININT", "BININT1", "BININT2", "LONG1"}
_TEXTS = {"BINUNICODE", "SHORT_BINSTRING"}
_OTHERS = {"BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"}
_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def refused_call(name: str) -> str:
    """The message for a pickle that calls `name`, a function a state dict does not need."""
    shown = "".join(c if c.isprintable() else "?" for c in one_line(name, 80))
    return (
        f"refused: the checkpoint's pickle would call {shown}; only tensors and plain containers "
        "are allowed, nothing was run"
    )


@dataclass(eq=False)
class _Obj:
    """What the unpickler would hold in one stack slot."""

    kind: str  # "int", "text", "global", "tuple", "storage", "tensor" or "object"
    size: int = 1  # elements or bytes it holds
    value: object = None  # an int's or a text's value, a global's name, a tuple's items


def check_pickles(data: bytes, count: int = 1, storage_bytes: int | None = None) -> None:
    """Refuse `data` when one of its first `count` pickles would build too much (see above).

    Args:
        data: a pickle, or several back to back (a legacy torch file starts with five).
        count: how many pickles to check; fewer is fine (torch then says what is missing).
        storage_bytes: legacy files only: what the storages may declare in all (the file size).

    Raises:
        CheckpointError: one line saying why, before anything is built.
    """
    stream = io.BytesIO(data)
    scan = _Scan(storage_bytes)
    for _ in range(count):
        if stream.tell() >= len(data):
            return
        scan.run(stream)


def _literal(name: str, arg: object) -> _Obj:
    if name in _INTS:
        return _Obj("int", 1, arg)
    if name in _TEXTS:
        return _Obj("text", len(arg), arg)
    if name == "GLOBAL":
        module, _, attr = str(arg).partition(" ")
        return _Obj("global", 1, f"{_MODULES.get(module, module)}.{attr}")
    if name == "EMPTY_TUPLE":
        return _Obj("tuple", 0, [])
    return _Obj("object", 0 if name.startswith("EMPTY") else 1)


class _Scan:
    """The unpickler's stack and memo as `_Obj`s, and what its calls have built so far."""

    def __init__(self, storage_bytes: int | None) -> None:
        self.stack: list[_Obj] = []
        self.marks: list[list[_Obj]] = []
        self.memo: dict[object, _Obj] = {}
        self.built = 0
        self.pos = 0
        self.storage_bytes = storage_bytes
        self.storages: dict[object, int] = {}
        self.declared = 0

    def run(self, stream: io.BytesIO) -> None:
        """Walk one pickle, up to and including its STOP."""
        self.stack, self.marks, self.memo = [], [], {}
        try:
            with warnings.catch_warnings():  # genops decoding a damaged STRING warns
                warnings.simplefilter("ignore")
                for op, arg, pos in pickletools.genops(stream):
                    self.pos = pos or 0
                    if op.name == "STOP":
                        self.pop(1)
                        return
                    self.step(op.name, arg)
        except CheckpointError:
            raise
        except ValueError:  # genops: an unknown opcode, a cut argument, text that is not text
            raise CheckpointError(DAMAGED) from None

    def step(self, name: str, arg: object) -> None:
        if name in _INTS or name in _TEXTS or name in _OTHERS or name in ("GLOBAL", "EMPTY_TUPLE"):
            self.stack.append(_literal(name, arg))
        elif name == "MARK":
            self.marks.append(self.stack)
            self.stack = []
        elif name == "TUPLE" or name in _TUPLES:
            items = self.pop_mark() if name == "TUPLE" else self.pop(_TUPLES[name])
            self.stack.append(_Obj("tuple", len(items), items))
        elif name in ("APPEND", "SETITEM"):
            self.pop(1 if name == "APPEND" else 2)
            self.top().size += 1
        elif name in ("APPENDS", "SETITEMS"):
            items = self.pop_mark()
            self.top().size += len(items)
        elif name in ("BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.top()
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise CheckpointError(DAMAGED)
            self.stack.append(self.memo[arg])
        elif name == "BINPERSID":
            self.stack.append(self.storage(self.pop(1)[0]))
        elif name in ("REDUCE", "NEWOBJ"):
            func, args = self.pop(2)
            self.stack.append(self.call(func, args))
        elif name == "BUILD":
            self.pop(1)
            self.top()
        elif name != "PROTO":  # an opcode torch's weights-only unpickler refuses too
            raise CheckpointError(DAMAGED)

    def pop(self, n: int) -> list[_Obj]:
        if len(self.stack) < n:
            raise CheckpointError(DAMAGED)
        items = self.stack[len(self.stack) - n :]
        del self.stack[len(self.stack) - n :]
        return items

    def pop_mark(self) -> list[_Obj]:
        if not self.marks:
            raise CheckpointError(DAMAGED)
        items, self.stack = self.stack, self.marks.pop()
        return items

    def top(self) -> _Obj:
        if not self.stack:
            raise CheckpointError(DAMAGED)
        return self.stack[-1]

    def storage(self, pid: _Obj) -> _Obj:
        """A persistent id: stored data. Legacy files allocate what it declares right away."""
        items = pid.value if pid.kind == "tuple" else []
        if self.storage_bytes is not None and len(items) >= 5 and items[4].kind == "int":
            key = items[2].value if items[2].kind in ("text", "int") else id(items[2])
            if key not in self.storages:
                self.storages[key] = max(int(items[4].value), 0)
                self.declared += self.storages[key]
                if self.declared > self.storage_bytes:
                    raise CheckpointError(_STORAGE_SIZE)
        return _Obj("storage")

    def call(self, func: _Obj, args: _Obj) -> _Obj:
        if func.kind != "global" or args.kind != "tuple":
            raise CheckpointError(DAMAGED)
        result, built = _apply(str(func.value), args.value)
        self.built += built
        if self.built > CALL_BUDGET + self.pos:
            raise CheckpointError(
                f"refused: the checkpoint's pickle would build over {CALL_BUDGET + self.pos:,} "
                f"objects from {self.pos:,} bytes (a memory bomb?); nothing was run"
            )
        return result


def _apply(name: str, args: list[_Obj]) -> tuple[_Obj, int]:
    """What `name(*args)` returns and how many elements it builds; refuse what a file must not do."""
    if name == _FROM_TYPE:
        if len(args) < 3 or args[0].kind != "global" or args[2].kind != "tuple":
            raise CheckpointError(DAMAGED)
        if args[0].value == _FROM_TYPE:  # never saved so; would nest without end
            raise CheckpointError(DAMAGED)
        return _apply(str(args[0].value), args[2].value)
    if name in _VIEWS or name == _QTENSOR:
        if not args or args[0].kind != "storage":
            what = f"a {args[0].kind}" if args else "nothing"
            raise CheckpointError(
                f"checkpoint is damaged: a tensor is rebuilt from {what}, not from stored data"
            )
        allocated = _numel(args[2]) if name == _QTENSOR and len(args) > 2 else 0
        return _Obj("tensor"), allocated
    if name in _TENSORS:
        return _Obj("tensor"), 0
    if name == _SPARSE:
        raise CheckpointError(
            "refused: the checkpoint holds a sparse tensor; only dense tensors are supported, "
            "nothing was run"
        )
    if name in _COPIES:
        built = _copied(name, args)
        return _Obj("object", built), built
    if name in _SMALL:
        return _Obj("object"), 1
    raise CheckpointError(refused_call(name))


def _copied(name: str, args: list[_Obj]) -> int:
    """Elements a copying call builds: as many as its source holds; `bytearray(n)`: n."""
    if not args:
        return 0
    source = args[0]
    if source.kind in ("tensor", "storage"):  # element by element, as Python objects
        raise CheckpointError(
            f"refused: the checkpoint's pickle would iterate over a tensor in {name}(); "
            "nothing was run"
        )
    if len(args) > 1 and name in ("_codecs.encode", "builtins.bytearray"):
        codec = args[1].value if args[1].kind == "text" else args[1].kind
        if str(codec).lower() not in _LINEAR_CODECS:  # punycode and idna are quadratic
            raise CheckpointError(
                f"refused: the checkpoint's pickle would encode text as {one_line(codec, 40)!r}; "
                "nothing was run"
            )
    if source.kind == "int":
        return max(int(source.value), 0) if name == "builtins.bytearray" else 1
    return source.size


def _numel(size: _Obj) -> int:
    """Elements a size tuple declares (non-int dimensions: torch refuses them itself)."""
    if size.kind != "tuple":
        return 0
    return math.prod(max(int(d.value), 0) for d in size.value if d.kind == "int")
