# -*- test-case-name: tests.test_tap -*-
"""``twistd mgpumanager``: command-line options and the service tree."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from mgpu.admin import Admin
from mgpu.api import BrokerResource, Operations
from mgpu.cards import Card, CardRooms, CardSchedulers
from mgpu.config import Config, ConfigError, load_config, read_token
from mgpu.control import ConsumerControl
from mgpu.events import EventBus
from mgpu.facade import Facade
from mgpu.fdlimit import FdLimit, describe, fds_needed, raise_fd_limit
from mgpu.footprints import LearnedSizes, StateDirError
from mgpu.gpu import GpuPoller, GpuReader, reader_for
from mgpu.lifecycle import IdleUnloader, Preloader
from mgpu.memory import MemoryWatch, MergedReadings
from mgpu.metrics import BrokerMetrics
from mgpu.openai_api import ModelDiscovery, ModelIndex, OpenAIRoutes
from mgpu.procs import ProcessTable, ProcTable
from mgpu.registry import HealthProber, Registry
from mgpu.relay import Relay
from mgpu.reload import LiveParts, Reloader, SighupReload
from mgpu.room import RoomMaker
from mgpu.scheduler import GpuScheduler, Leases, SchedulerStats
from mgpu.shed import ConnectionCap
from mgpu.site import AccessLog, BrokerSite
from mgpu.sse import EventStreams
from mgpu.status import StatusView
from mgpu.systemd import SystemdNotifier
from mgpu.tunnel import TunnelService
from mgpu.upstream import UpstreamClient

log = Logger()

#: Idle upstream connections are closed before the consumers' own keep-alive
#: (uvicorn's default is 5 s) so a reused connection is never one they just closed.
CACHED_CONNECTION_TIMEOUT_S = 4


class Options(usage.Options):
    """``twistd mgpumanager [--config PATH | --demo] [--listen ENDPOINT]``."""

    optParameters = [
        ["config", "c", "config/consumers.yaml", "The configuration file (YAML)."],
        ["listen", "l", None, "A Twisted server endpoint; overrides listen: in the file."],
        ["demo-gpus", None, 1, "How many simulated cards the demo runs (1 or 2).", int],
    ]
    optFlags = [["demo", None, "Run simulated consumers and a simulated GPU inside the daemon."]]

    def postOptions(self) -> None:
        if self["demo-gpus"] not in (1, 2):
            raise usage.UsageError(f"--demo-gpus must be 1 or 2, not {self['demo-gpus']}")


def makeService(options: Options, reactor: Any = None) -> IService:
    """Build the daemon's services, or exit with status 2 on a bad configuration."""
    if reactor is None:
        from twisted.internet import reactor
    try:
        table: ProcessTable | None = None
        if options["demo"]:
            config, gpu_readers, demo, table = _demo(reactor, options["demo-gpus"])
        else:
            config, gpu_readers, demo = load_config(options["config"]), None, None
        listen = with_backlog(options["listen"] or config.listen)
        try:
            endpoint = serverFromString(reactor, listen)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            source, field = ("--listen", "") if options["listen"] else (options["config"], "listen")
            if isinstance(e, IndexError):  # systemd: asks for a socket nobody passed
                why = "no socket was passed by systemd (LISTEN_FDS and LISTEN_FDNAMES)"
            else:
                why = f"not a usable endpoint {listen!r}: {e}"
            raise ConfigError(source, field, why) from None
        token = read_token(config.auth.token_file, options["config"])
        try:
            learned = LearnedSizes.open(config.state_dir)
        except StateDirError as e:
            raise ConfigError(options["config"], "state_dir", str(e)) from None
    except ConfigError as e:
        sys.stderr.write(f"mgpumanager: {e}\n")
        raise SystemExit(2) from None
    config_path = None if options["demo"] else options["config"]
    fd_limit = raise_fd_limit()
    line, short = describe(fd_limit, fds_needed(config))
    (log.warn if short else log.info)("{line}", line=line)
    return build_service(
        config, reactor, endpoint, gpu_readers, demo, token, config_path,
        listen_override=bool(options["listen"]), fd_limit=fd_limit, learned=learned,
        process_table=table,
    )  # fmt: skip


#: The listen backlog when the endpoint names none: Twisted's 50 makes a burst of
#: clients retransmit their SYN for seconds.
LISTEN_BACKLOG = 1024


def with_backlog(listen: str) -> str:
    """A ``tcp``/``tcp6``/``unix`` endpoint with ``backlog=1024`` unless it names one."""
    kind = listen.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in listen:
        return f"{listen}:backlog={LISTEN_BACKLOG}"
    return listen


def build_service(
    config: Config,
    reactor: Any,
    endpoint: Any,
    gpu_readers: Mapping[int, GpuReader] | None = None,
    extra: IService | None = None,
    token: bytes | None = None,
    config_path: str | None = None,
    environ: Mapping[str, str] = os.environ,
    listen_override: bool = False,
    fd_limit: FdLimit | None = None,
    learned: LearnedSizes | None = None,
    process_table: ProcessTable | None = None,
) -> MultiService:
    """The daemon: web server, health prober and GPU poller, sharing one set of collaborators.

    ``config_path`` is the file a reload reads again (None: the demo, no reload);
    ``environ`` is where systemd's notify socket and watchdog are named;
    ``listen_override``: ``--listen`` was given, so the file's ``listen`` never applies;
    ``fd_limit``: the descriptor limit, whose budget caps client connections (None: no cap);
    ``learned``: the learned footprints (None: kept in memory only);
    ``process_table``: where consumers' processes are looked up (None: this host's /proc).
    """
    upstream = UpstreamClient(reactor, max_idle=32, idle_timeout_s=CACHED_CONNECTION_TIMEOUT_S)
    control_pool = _pool(reactor, max_per_host=4)

    events = EventBus(reactor)
    registry = Registry(config.consumers, reactor, events)
    control = ConsumerControl(HTTPClient(Agent(reactor, pool=control_pool)), reactor)
    table, learned = process_table or ProcTable(), learned or LearnedSizes(None)
    if hasattr(reactor, "getThreadPool"):  # the file is written off the reactor thread
        learned.background = lambda work: deferToThreadPool(reactor, reactor.getThreadPool(), work)
    cards, rooms, scheduler = _cards(
        config, reactor, registry, control, events, gpu_readers or {}, table, learned
    )
    # Consumers are looked at on all their cards at once; room is made per card.
    watch = cards[0].watch
    if len(cards) > 1:
        watch = MemoryWatch(table, MergedReadings([c.poller for c in cards]), learned, control)
    # The index reads the facade's configuration, which a reload replaces.
    models = ModelIndex(lambda: facade.config)
    prober = HealthProber(
        registry, control, reactor, config.health, watch, ModelDiscovery(models, control)
    )
    facade = Facade(
        config=config,
        registry=registry,
        prober=prober,
        scheduler=scheduler,
        relay=Relay(upstream, reactor),
        control=control,
        clock=reactor,
        events=events,
    )
    streams = EventStreams(events, reactor)
    metrics = BrokerMetrics(
        events, cards[0].poller, registry, scheduler, streams, clock=reactor, watch=watch,
        cards=cards,
        tunnels=facade.tunnels,
    )  # fmt: skip
    resource = BrokerResource(
        facade,
        StatusView(cards[0].poller, registry, scheduler, upstream, watch, cards),
        token,
        OpenAIRoutes(facade, models),
    )
    site = BrokerSite(
        resource,
        reactor,
        AccessLog(reactor),
        max_body_bytes=config.limits.max_body_mib * 2**20,
        on_refused=lambda: scheduler.reject("payload_too_large"),
        observers=[metrics.observe],
        header_timeout_s=config.limits.header_timeout_s,
        on_header_timeout=metrics.header_timed_out,
        cap=ConnectionCap(
            reactor,
            None if fd_limit is None else fd_limit.for_clients,
            on_shed=metrics.connection_shed,
            ceiling=None if fd_limit is None else fd_limit.ceiling,
        ),
    )
    reloader = Reloader(
        config_path,
        config,
        LiveParts(
            facade, registry, scheduler, cards, prober, site, resource,
            new_reader=lambda new, index: reader_for(new.gpu, reactor, index),
        ),
        listening_on=None if listen_override else config.listen,
    )  # fmt: skip
    resource.serve_operations(
        Operations(Admin(registry, scheduler, rooms, control, events), reloader, streams, metrics)
    )

    top = MultiService()
    if extra is not None:
        extra.setServiceParent(top)
    _Cleanup(scheduler, upstream, control_pool).setServiceParent(top)
    for card in cards:
        card.poller.setServiceParent(top)
    prober.setServiceParent(top)
    # After the prober: preloading joins its first probes (SPEC 9.6).
    Preloader(registry, scheduler, rooms, prober).setServiceParent(top)
    IdleUnloader(registry, scheduler, control, reactor, events).setServiceParent(top)
    TunnelService(facade.tunnels).setServiceParent(top)  # stopped after the listener
    listener = _Listener(endpoint, site)
    listener.on_port = site.cap.watch
    listener.setServiceParent(top)
    if config_path is not None:
        SighupReload(reloader, reactor).setServiceParent(top)
    SystemdNotifier(reactor, listener.listening, environ).setServiceParent(top)
    return top


def _cards(
    config: Config,
    reactor: Any,
    registry: Registry,
    control: ConsumerControl,
    events: EventBus,
    readers: Mapping[int, GpuReader],
    table: ProcessTable,
    learned: LearnedSizes,
) -> tuple[list[Card], CardRooms, CardSchedulers]:
    """Per managed card: a poller, a memory watch, a room maker and a lease (SPEC 9.5).

    ``readers`` replaces ``gpu.source`` for the cards it names (the demo's simulated
    cards). With one card, room-making counts every consumer as on it.
    """
    stats = SchedulerStats()
    several = len(config.gpu.cards) > 1
    parts = []
    for index in config.gpu.cards:
        reader = readers.get(index) or reader_for(config.gpu, reactor, index)
        poller = GpuPoller(reader, reactor, config.gpu.poll_interval_s, index=index)
        watch = MemoryWatch(table, poller, learned, control)
        room = RoomMaker(
            registry, poller, control, reactor, config.gpu, config.scheduler, stats, events,
            watch, card=index if several else None,
        )  # fmt: skip
        parts.append((index, poller, watch, room))
    rooms = CardRooms(registry, {index: room for index, _, _, room in parts})
    cards = [
        Card(index, poller, watch, room, GpuScheduler(
            registry, reactor, config.scheduler, rooms.prepare, stats, events, rooms.swap_cost
        ))
        for index, poller, watch, room in parts
    ]  # fmt: skip
    lanes = {card.index: card.lane for card in cards}
    return cards, rooms, CardSchedulers(registry, lanes, reactor)


class _Listener(StreamServerEndpointService):
    """The web server; a port that cannot be had stops the daemon with status 1.

    By default the service logs the failure and the process carries on
    listening nowhere, which systemd's ``Restart=on-failure`` never notices.
    """

    _raiseSynchronously = True
    #: Called with the listening port once there is one.
    on_port: Callable[[object], object] | None = None

    def listening(self) -> Deferred[object]:
        """Fires with the port once the server listens (after the service started)."""
        waiting = self._waitingForPort
        assert waiting is not None, "the listener has not started"
        mine: Deferred[object] = Deferred()

        def relay(result: object) -> object:
            mine.callback(result)
            return result  # the service's own chain goes on unchanged

        waiting.addBoth(relay)
        return mine

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
            if self.on_port is not None and self._waitingForPort is not None:
                self._waitingForPort.addCallback(self.on_port)
        except CannotListenError as e:
            where = f"{e.interface or '*'}:{e.port}"
            sys.stderr.write(
                f"mgpumanager: cannot listen on {where}: {e.socketError}; choose another "
                "address with --listen ENDPOINT (make run LISTEN=ENDPOINT)\n"
            )
            raise SystemExit(1) from None


class _QuietClientFactory(_HTTP11ClientFactory):
    """Upstream connections come and go all day: do not log each one."""

    noisy = False


def _pool(reactor: Any, max_per_host: int) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT_S
    pool._factory = _QuietClientFactory
    return pool


class _Cleanup(Service):
    """On shutdown: cancel detached GPU work and close the connection pools."""

    def __init__(
        self, scheduler: Leases, upstream: UpstreamClient, control: HTTPConnectionPool
    ) -> None:
        self._scheduler = scheduler
        self._upstream = upstream
        self._control = control

    def stopService(self) -> Deferred[object]:
        super().stopService()
        self._scheduler.stop()
        closing = [self._upstream.close(), self._control.closeCachedConnections()]
        return gatherResults(closing)  # type: ignore[return-value]


def _demo(
    reactor: Any, gpus: int
) -> tuple[Config, Mapping[int, GpuReader], IService, ProcessTable]:
    """Start the simulated consumers now, so the configuration can name their ports."""
    from mgpu.sim import start_demo

    started = start_demo(reactor, gpus)
    result: list[Any] = []
    started.addBoth(result.append)
    if not result or isinstance(result[0], BaseException) or hasattr(result[0], "raiseException"):
        raise ConfigError("--demo", "", f"the simulated consumers could not start: {result}")
    demo = result[0]
    return demo.config, demo.gpu_readers, demo.service(), demo.process_table
