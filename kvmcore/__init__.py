"""kvmcore: run a real KVM guest from Python and carry its state, clock and TSC across a migration."""

from __future__ import annotations

from .errors import GuestError, KvmError, KvmIoctlError, StateError, Unsupported
from .guest import Guest, GuestConfig
from .memory import GuestMemory
from .snapshot import Pvclock, Snapshot
from .system import System
from .vcpu import Vcpu
from .vm import Vm
