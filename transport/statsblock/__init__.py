"""The shared-memory stats block: live figures of a running transport, readable without asking it.

The transport process writes, tools and the console read; a reader never
talks to the transport, so ``sipwire ctl stats`` answers even when every
I/O thread is saturated. One block per instance, a POSIX shared-memory
segment named from the uid, the instance and its runtime directory, so two
instances (or two users) never share one.

* :mod:`.layout`: the byte layout (offsets, record formats, capacities,
  constants) and the rules writer and readers keep, seqlocks included;
* :mod:`.shm`: the segment's name, attaching it without resource_tracker
  surprises, the mapping both sides share;
* :mod:`.writer`: the single writer (:class:`StatsWriter`), the slot free
  list, replacing a dead writer's block;
* :mod:`.reader`: :class:`StatsReader`, which attaches, checks and copies records whole;
* :mod:`.records`: the records it returns;
* :mod:`.views`: those records as the dicts ``sipwire ctl stats``,
  ``sipwire ctl connections`` and the console print.

The names below are the ones the rest of sipwire imports from here.
"""

from sipwire.errors import StatsError
from sipwire.transport.stages import LATENCY_BUCKETS_MS
from sipwire.transport.statsblock.layout import (
    _SLOT as _SLOT,  # bench/statsbench.py rewrites raw slots
)
from sipwire.transport.statsblock.layout import (
    HANDSHAKE_BUCKETS_MS,
    HISTOGRAM_NAMES,
    HISTOGRAM_TLS,
    HISTOGRAM_WS,
    HISTOGRAMS,
    LATENCY_HISTOGRAMS,
    LAYOUT_VERSION,
    MAGIC,
    SLOT_BYTES,
    STALE_SECONDS,
    STATIC_BYTES,
    STATUS_RUNNING,
    STATUS_STOPPED,
    SUPERVISOR_INTERVAL_SECONDS,
    THREAD_ACTIVE,
    THREAD_BYTES,
    THREAD_RETIRING,
    WORKER_BYTES,
    Capacities,
)
from sipwire.transport.statsblock.reader import (
    StatsLayoutError,
    StatsReader,
    StatsUnavailableError,
    StatsWriterGoneError,
)
from sipwire.transport.statsblock.records import ConnectionRecord, Histogram
from sipwire.transport.statsblock.shm import (
    NAME_FILE,
    block_name,
    new_block_name,
    publish_block_name,
    published_block_name,
)
from sipwire.transport.statsblock.shm import (
    _open_shm as _open_shm,  # bench/statsbench.py attaches a second writer on purpose
)
from sipwire.transport.statsblock.views import connections_view, histogram_view, stats_view
from sipwire.transport.statsblock.writer import (
    FreeList,
    HeaderFigures,
    StatsBusyError,
    StatsWriter,
    remove_stale_block,
)

__all__ = [
    "HANDSHAKE_BUCKETS_MS",
    "HISTOGRAMS",
    "HISTOGRAM_NAMES",
    "HISTOGRAM_TLS",
    "HISTOGRAM_WS",
    "LATENCY_BUCKETS_MS",
    "LATENCY_HISTOGRAMS",
    "LAYOUT_VERSION",
    "MAGIC",
    "NAME_FILE",
    "SLOT_BYTES",
    "STALE_SECONDS",
    "STATIC_BYTES",
    "STATUS_RUNNING",
    "STATUS_STOPPED",
    "SUPERVISOR_INTERVAL_SECONDS",
    "THREAD_ACTIVE",
    "THREAD_BYTES",
    "THREAD_RETIRING",
    "WORKER_BYTES",
    "Capacities",
    "ConnectionRecord",
    "FreeList",
    "HeaderFigures",
    "Histogram",
    "StatsBusyError",
    "StatsError",
    "StatsLayoutError",
    "StatsReader",
    "StatsUnavailableError",
    "StatsWriter",
    "StatsWriterGoneError",
    "block_name",
    "connections_view",
    "histogram_view",
    "new_block_name",
    "publish_block_name",
    "published_block_name",
    "remove_stale_block",
    "stats_view",
]
