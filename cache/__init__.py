"""graphcache.cache: the versioned cache tier (in memory and on Redis)."""

from ._errors import (
    CacheError,
    CacheUnavailable,
    InvalidArgument,
    InvalidKey,
    InvalidValue,
    InvalidVersion,
    KeyExists,
    LockLost,
    ObjectLocked,
    ValueTooLarge,
    VersionMismatch,
)
from ._memory import MemoryCache, MemoryCacheStatistics
from ._redis import RedisCache, RedisCacheStatistics
from ._types import CacheItem, LockHandle, VersionedCache
from ._validate import check_key, check_seconds, check_version

__all__ = (
    "CacheError",
    "CacheItem",
    "CacheUnavailable",
    "InvalidArgument",
    "InvalidKey",
    "InvalidValue",
    "InvalidVersion",
    "KeyExists",
    "LockHandle",
    "LockLost",
    "MemoryCache",
    "MemoryCacheStatistics",
    "ObjectLocked",
    "RedisCache",
    "RedisCacheStatistics",
    "ValueTooLarge",
    "VersionMismatch",
    "VersionedCache",
    "check_key",
    "check_seconds",
    "check_version",
)
