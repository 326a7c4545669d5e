"""graphcache.actors: mailbox actors, the consistent-hash ring, membership and the Node."""

from ._actor import RootActor
from ._batch import Rebuilder
from ._errors import ActorDead, ActorError, InvalidArgument, NodeNotRunning, ReadTimeout, VersionNotReached
from ._keys import graph_key
from ._membership import (
    InvalidMembershipConfig,
    Membership,
    MembershipStatistics,
    RedisMembership,
    StaticMembership,
)
from ._messages import Changed, Message, Refresh, Stop
from ._node import Node
from ._options import (
    DEFAULT_MIN_REBUILD_INTERVAL,
    DEFAULT_SWEEP_INTERVAL,
    ActorOptions,
    Consistency,
    NodeOptions,
)
from ._retry import RetryPolicy, is_transient
from ._ring import DEFAULT_PROBES, EmptyRing, InvalidNodeId, InvalidRingConfig, Ring
from ._stats import ActorStatistics, HistogramSnapshot, NodeStatistics

__all__ = (  # noqa: RUF022  (plain sorted order, as tests/test_all_attributes.py checks)
    "ActorDead",
    "ActorError",
    "ActorOptions",
    "ActorStatistics",
    "Changed",
    "Consistency",
    "DEFAULT_MIN_REBUILD_INTERVAL",
    "DEFAULT_PROBES",
    "DEFAULT_SWEEP_INTERVAL",
    "EmptyRing",
    "HistogramSnapshot",
    "InvalidArgument",
    "InvalidMembershipConfig",
    "InvalidNodeId",
    "InvalidRingConfig",
    "Membership",
    "MembershipStatistics",
    "Message",
    "Node",
    "NodeNotRunning",
    "NodeOptions",
    "NodeStatistics",
    "ReadTimeout",
    "Rebuilder",
    "RedisMembership",
    "Refresh",
    "RetryPolicy",
    "Ring",
    "RootActor",
    "StaticMembership",
    "Stop",
    "VersionNotReached",
    "graph_key",
    "is_transient",
)
