"""Edge client and the device's generation loop over one bidirectional gRPC stream per session.

Contract: `EdgeClient.generate(drafter, prompt_ids, max_new_tokens, policy)` opens a session,
runs the round loop of `gelato.device.generate` with this stream as its `verify`, closes the session and
returns a `GenerationResult` whose `token_ids` equal what the target alone would generate (greedy)
or are distributed as its samples (sampling). The client itself only opens, verifies, closes and
counts bytes. Drafting runs on a worker thread, never on the event loop.
Errors from the edge surface as `EdgeError` carrying the gRPC status code and details; an edge
that does not answer at all within `connect_timeout_s` as `EdgeUnreachable`. When the session
fails mid-generation (the edge stopped, a verdict never came), the result keeps the tokens
generated so far, with `stats.stop_reason == "error"` and `result.error` saying why. Once the
generation is complete, failing to close the session (the edge went away after its last verdict)
changes nothing: the result is kept as it is, the failure only logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import grpc

from gelato.channel import CLIENT_OPTIONS, PLAINTEXT_OPTIONS
from gelato.deadline import within
from gelato.device.client_errors import (
    FULL,
    FULL_PAUSE_S,
    EdgeError,
    EdgeUnreachable,
    FailedOpens,
    StreamIO,
    call_error,
    check_same_target,
    edge_answered,
    expect_verdict,
    info_error,
    parsed,
    worth_another_open,
)
from gelato.device.config import DeviceConfig
from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant, wire_bytes
from gelato.device.generate import (
    Exchange,
    GenerationResult,
    Limits,
    Verify,
    VerifyError,
    charge_after_end,
    charge_bytes,
    merge_results,
    speculative_generate,
)
from gelato.device.pipeline import Link, pipelined_generate
from gelato.device.policy import FixedK, Policy
from gelato.power import NullMeter
from gelato.sampling import generation_seed
from gelato.security import bearer_metadata, check_token_transport
from gelato.types import DraftBlock, EdgeInfo, SamplingParams, SessionInfo, SessionOpen, Telemetry, Verdict
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from gelato.wire import (
    MODEL_LOADING,
    WireError,
    decode_info,
    decode_opened,
    encode_block,
    encode_generate,
    encode_open,
    split_streamed,
)

T = TypeVar("T")
log = logging.getLogger("gelato.device")

__all__ = ["EdgeClient", "EdgeError", "EdgeUnreachable", "GenerationResult"]


WAIT_FIRST_S, WAIT_MAX_S = 0.1, 2.0  # `EdgeClient.wait_ready`'s pauses between asks
CLOSE_WAIT_S = 1.0  # after a session's close, at most this long for each answer still due, then its status


class EdgeClient(StreamIO):
    """`credentials`: TLS (`gelato.security.channel_credentials`), None for plaintext; `token`: the
    bearer token sent with every call, which is refused (`SecurityConfigError`) in plaintext to a
    target naming any non-loopback host unless `insecure`; `server_name`: the name to check the
    edge's certificate against when it differs from the address (e.g. a certificate for `edge`
    reached at an IP)."""

    def __init__(
        self,
        target: str,
        deadline_s: float = DeviceConfig.session_deadline_s,  # the defaults are the CLI's, written there
        verdict_timeout_s: float = DeviceConfig.verdict_timeout_s,
        connect_timeout_s: float = DeviceConfig.connect_timeout_s,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        server_name: str | None = None,
        failovers: int = DeviceConfig.failovers,
        insecure: bool = False,
        edge_wait_s: float = DeviceConfig.edge_wait_s,
    ) -> None:
        check_token_transport(target, credentials is not None, token, insecure)
        self.target = target
        self.edge_wait_s = edge_wait_s
        self.deadline_s = deadline_s
        self.verdict_timeout_s = verdict_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.failovers = failovers
        self.metadata = bearer_metadata(token)
        self.tls = credentials is not None
        # round_robin over every address the target resolves to (`dns:///edge:50051`, or
        # `ipv4:HOST:P1,HOST:P2`): replicas without a load balancer of our own. A session is one
        # stream, so it stays on its replica.
        options: list[tuple[str, int | str]] = [*CLIENT_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=options + PLAINTEXT_OPTIONS)
        else:
            options += [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.GelatoStub(self.channel)
        # One worker: drafter forwards stay off the event loop and keep their KV on one thread.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter")
        self._warned_ahead = False
        self._warned_cap = False
        # A generation waited `edge_wait_s` for its edge in vain: the next generation's first open
        # that finds no edge ends the run at once instead of waiting the whole time again.
        self._waited_in_vain = False

    async def connect(self, timeout_s: float | None = None) -> None:
        """Wait until the channel is connected, at most `connect_timeout_s` (or `timeout_s`): a gone
        edge is reported as unreachable within seconds instead of a call waiting for its deadline."""
        timeout_s = self.connect_timeout_s if timeout_s is None else timeout_s
        try:
            await within(self.channel.channel_ready(), timeout_s)
        except TimeoutError:
            raise EdgeUnreachable(self.target, timeout_s, self.tls) from None

    async def info(
        self,
        connect_timeout_s: float | None = None,
        spent: list[int] | None = None,
        radio: EnergyAccountant | None = None,
    ) -> EdgeInfo:
        """The edge's `Info`; `spent` ([up, down] wire bytes) counts the request once sent and the
        answer once read; `radio` is told the transfer (its tail: `EnergyAccountant.radio_busy`)."""
        timeout_s = self.connect_timeout_s if connect_timeout_s is None else connect_timeout_s
        await self.connect(timeout_s)
        if spent is not None:
            spent[0] += wire_bytes(pb.InfoRequest().ByteSize())
        if radio is not None:
            radio.radio_busy()
        try:
            resp = parsed(await self.stub.Info(pb.InfoRequest(), timeout=timeout_s, metadata=self.metadata))
            if spent is not None:
                spent[1] += wire_bytes(resp.ByteSize())
            return decode_info(resp)
        except grpc.aio.AioRpcError as exc:
            raise info_error(exc, timeout_s, self.deadline_s) from exc
        except WireError as exc:
            raise EdgeError(grpc.StatusCode.INTERNAL, str(exc), by_edge=False) from exc
        finally:
            if radio is not None:
                radio.radio_idle()

    async def wait_ready(
        self,
        wait_s: float,
        any_unavailable: bool,
        first_connect_s: float | None = None,
        spent: list[int] | None = None,
        radio: EnergyAccountant | None = None,
    ) -> EdgeInfo:
        """`info()`, asked again (backing off from 0.1 to 2 s) for up to `wait_s` while the edge
        answers that its model is still loading, and with `any_unavailable` while it answers
        UNAVAILABLE at all or nothing answers (a restart: the process draining, gone, binding, then
        loading); then its last error. The first ask connects (and is answered) within
        `first_connect_s`, by default `connect_timeout_s` as any call (a slow handshake is no absent
        edge), later ones within what is left of `wait_s`. `spent` ([up, down]) counts the asks' wire
        bytes and `radio` is told of each (a failover charges both to its generation)."""
        deadline, pause = time.monotonic() + wait_s, WAIT_FIRST_S
        connect_s = self.connect_timeout_s if first_connect_s is None else first_connect_s
        while True:
            try:
                return await self.info(connect_timeout_s=connect_s, spent=spent, radio=radio)
            except EdgeError as exc:
                waiting = exc.code == grpc.StatusCode.UNAVAILABLE and (any_unavailable or exc.details == MODEL_LOADING)
                if not waiting or time.monotonic() + pause > deadline:
                    raise
                log.info("the edge is not ready (%s); asking again in %.1f s", exc.details, pause)
            await asyncio.sleep(pause)
            pause = min(2 * pause, WAIT_MAX_S)
            connect_s = max(0.1, min(self.connect_timeout_s, deadline - time.monotonic()))

    async def close(self) -> None:
        await self.channel.close()
        self.executor.shutdown(wait=False)

    async def generate(
        self,
        drafter: Drafter,
        prompt_ids: list[int],
        max_new_tokens: int,
        policy: Policy,
        accountant: EnergyAccountant | None = None,
        on_round: Callable[[Telemetry], None] | None = None,
        on_session: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """One generation: open a session, the round loop (`gelato.device.generate`), close.
        `accountant` measures energy (default: none, NaN); `on_round` gets each round's telemetry
        as it completes (the `--trace` writer); `on_session(n)` is told before each open which
        session of the generation its rounds will belong to (0, then one more per session that
        ran: the result's `failovers` count them; an open that fails runs none). When the edge goes away mid-generation
        (UNAVAILABLE), the session is re-opened — on another replica when `--edge` names several —
        with the prompt and the tokens accepted so far as its prefix, up to `failovers` attempts;
        an open that fails UNAVAILABLE is one (the first open too: a replica that just died), and
        before the next the device waits up to `edge_wait_s` (per generation) for an edge to
        answer ready: a lone edge that restarts is gone, then binds, then loads its model,
        refusing opens meanwhile. The output is what an uninterrupted run gives (draws are keyed
        by token position). An open failing otherwise, or with no attempt left before any session
        ran, raises as it did (`EdgeUnreachable`: nothing answered)."""
        acct = accountant or EnergyAccountant(NullMeter(), None)
        # The edge's draws, keyed by position, get a seed of this generation's own (the prompt and
        # how often the drafter generated it before, `Drafter.begin_generation`, which keys its own
        # draws so too; the same in every session of the generation): see `generation_seed`.
        sampling, repeat = drafter.params, drafter.begin_generation(prompt_ids)
        if not sampling.greedy:
            sampling = replace(sampling, seed=generation_seed(sampling.seed, prompt_ids, repeat))
        res: GenerationResult | None = None  # what the sessions so far gave (None: none opened yet)
        failed: FailedOpens | None = None  # the opens that failed since the last session ran
        left, wait_until = self.failovers, 0.0
        unanswered = False  # the wait for the edge ran out with no edge ready
        try:
            # Energy from here, as `elapsed_s` is: the open (the edge's prefill) is the generation's.
            t0 = time.perf_counter()  # then the opening reading: the energy's span lies within elapsed_s's
            acct.opening()
            while True:
                done = res.token_ids if res is not None else []
                if on_session is not None:
                    on_session(0 if res is None else res.failovers + 1)
                acct.radio_busy()  # the connect and the open transfer from here: the last tail ends
                try:
                    prefix, begun = [*prompt_ids, *done], None if res is None else (res.target_model, res.target_eos)
                    args = (policy, acct, on_round, sampling, begun)
                    more = await self._session(drafter, prefix, max_new_tokens - len(done), *args)
                except EdgeError as exc:  # the open failed: no session ran
                    failed = failed or FailedOpens()
                    failed.add(exc, acct.opening_spent_j())  # the attempt cost the device all the same
                    unanswered = unanswered and not edge_answered(exc)  # a refusal: an edge is there
                    # A first open that found no edge at all is tried again only when there is time
                    # to wait for one: without, the caller's report (the run ends) comes at once.
                    no_edge = res is None and isinstance(exc, EdgeUnreachable)
                    hopeless = no_edge and (self.edge_wait_s <= 0 or self._waited_in_vain)
                    if not worth_another_open(exc, res is not None) or left == 0 or hopeless:
                        self._waited_in_vain = unanswered or hopeless  # no edge since a wait in vain
                        if res is None:
                            raise  # no session ever ran: the caller reports it (unreachable: the run ends)
                        failed.settle_on(res, policy, acct)
                        break
                else:
                    self._waited_in_vain = False  # an edge answered
                    res = more if res is None else merge_results(res, more)
                    if failed is not None:  # opens that failed before this session: its generation's
                        failed.settle_on(res, policy, acct, keep_error=False)
                        failed = None
                    lost = isinstance(res.failure, EdgeError) and res.failure.code == grpc.StatusCode.UNAVAILABLE
                    if not lost or left == 0:
                        break
                left -= 1
                why = str(failed.last) if failed is not None else res.error if res is not None else ""
                n_done = len(res.token_ids) if res is not None else 0
                log.warning("edge session failed (%s); opening again with %d accepted tokens", why, n_done)
                # The generation's energy goes on from here (the wait for the edge included); the
                # radio's tail runs until the next transfer (an ask, the re-open) cuts it short.
                acct.opening()
                if failed is not None and failed.last is not None and failed.last.code == FULL:
                    # The replica that took the re-open is full (it said: try again later); the
                    # next attempt may reach another (round_robin), or this one with room again.
                    await asyncio.sleep(FULL_PAUSE_S)
                elif (failed is not None or left == 0) and self.edge_wait_s > 0:
                    # A lone edge restarting: let it come back, before the last attempt too (with
                    # `--failovers 1` the only one; an edge that is up answers the first ask).
                    failed = failed or FailedOpens()  # the asks' bytes are the failover's
                    if not wait_until:
                        log.warning("waiting up to %g s for the edge to come back (--edge-wait-s)", self.edge_wait_s)
                        wait_until = time.monotonic() + self.edge_wait_s
                    left_s = wait_until - time.monotonic()
                    if left_s > 0:  # each ask within what is left of the wait
                        asked = [0, 0]  # the asks' bytes: radio energy of this generation's failover
                        first_s = max(0.1, min(self.connect_timeout_s, left_s))
                        try:
                            await self.wait_ready(
                                left_s, any_unavailable=True, first_connect_s=first_s, spent=asked, radio=acct
                            )
                            unanswered = False
                        except EdgeError as exc:  # still not ready: the attempt will say so
                            unanswered = exc.code == grpc.StatusCode.UNAVAILABLE
                        failed.bytes_up += asked[0]
                        failed.bytes_down += asked[1]
            # The close (the last session's) is the generation's time: its energy too, to here.
            charge_after_end(res.stats, policy, acct)
            res.elapsed_s = time.perf_counter() - t0
        except BaseException:  # the generation reports no energy: what is pending is in no total
            acct.abandon()
            raise
        finally:
            acct.forget_opening()
        return res

    async def _session(
        self,
        drafter: Drafter,
        prompt_ids: list[int],
        max_new_tokens: int,
        policy: Policy,
        acct: EnergyAccountant,
        on_round: Callable[[Telemetry], None] | None,
        sampling: SamplingParams,
        target: tuple[str, tuple[int, ...] | None] | None = None,
    ) -> GenerationResult:
        """One session stream from open to close; `sampling`: what the open asks the edge for;
        `target`: for a re-open, the (target model, end tokens) the generation began with."""
        await self.connect()
        call = self.stub.Session(timeout=self.deadline_s, metadata=self.metadata)
        try:
            return await self._generate(
                call, drafter, prompt_ids, max_new_tokens, policy, acct, on_round, sampling, target
            )
        except grpc.aio.AioRpcError as exc:
            raise call_error(exc.code(), exc.details(), self.deadline_s) from exc
        finally:
            call.cancel()  # no-op after a clean close; frees the edge session on any failure

    async def _generate(
        self,
        call: grpc.aio.StreamStreamCall,
        drafter: Drafter,
        prompt_ids: list[int],
        max_new_tokens: int,
        policy: Policy,
        acct: EnergyAccountant,
        on_round: Callable[[Telemetry], None] | None,
        sampling: SamplingParams,
        target: tuple[str, tuple[int, ...] | None] | None = None,
    ) -> GenerationResult:
        loaded = drafter.loaded
        open_msg = encode_open(
            SessionOpen(
                prefix_ids=tuple(prompt_ids),
                tokenizer_fingerprint=loaded.fingerprint,
                sampling=sampling,
                max_new_tokens=max_new_tokens,
                drafter_model=loaded.name,
            )
        )
        close_msg = pb.DeviceMessage(close=pb.CloseSession())
        await self._write(call, open_msg)
        reply: pb.EdgeMessage | None = None
        try:
            reply = await self._read(call)
            if reply.WhichOneof("kind") != "opened":
                raise EdgeError(
                    grpc.StatusCode.INTERNAL, f"expected SessionOpened, got {reply.WhichOneof('kind')}", by_edge=False
                )
            try:
                opened = decode_opened(reply.opened)
            except WireError as exc:
                raise EdgeError(grpc.StatusCode.INTERNAL, str(exc), by_edge=False) from exc
            # The target's end tokens end the generation; an edge that does not say them (older)
            # leaves the drafter's (same tokenizer). What is compared across a failover is these.
            eos = opened.eos_token_ids if opened.eos_token_ids is not None else loaded.eos_token_ids
            check_same_target(opened.target_model, tuple(sorted(set(eos))), target)
        except VerifyError as exc:
            exc.bytes_up += wire_bytes(open_msg.ByteSize())  # written all the same (a refused re-open)
            exc.bytes_down += wire_bytes(reply.ByteSize()) if reply is not None else 0  # read, no SessionOpened
            raise
        # Opening costs bytes outside any round: counted in the generation's totals (and the close,
        # once written: a session that failed is not closed).
        session_bytes = (wire_bytes(open_msg.ByteSize()), wire_bytes(reply.ByteSize()))

        async def verify(block: DraftBlock) -> Exchange:
            up = encode_block(block)
            await self._write(call, up)
            return await self._answer(call, block.round, wire_bytes(up.ByteSize()))

        transport: Verify = verify
        if policy.edge_streams:
            transport = self._streamed(call, max_new_tokens, policy.options.stream_tokens)
        # The target's window bounds the generation, the drafter's own the drafting (a drafter
        # with a shorter one must not draft past it: absolute positions fail, rotary ones stop
        # agreeing); past it the rounds go on with K = 0. The target's end tokens end it: a
        # drafter whose generation config lists other ones (same tokenizer) would stop early, or
        # go on past the target's end (and wait forever for a token `Generate` never streams).
        limits = Limits(max_new_tokens, opened.context_limit, opened.max_draft_tokens, eos, loaded.context_limit)
        self._warn_cap(policy, opened.max_draft_tokens)
        link = self._link(call, policy, opened)
        if link is not None:
            result = await pipelined_generate(
                drafter, link, policy, prompt_ids, limits, acct, on_round, self.offload, session_bytes
            )
        else:
            result = await speculative_generate(
                drafter, transport, policy, prompt_ids, limits, acct, on_round, self.offload, session_bytes
            )
        result.target_model, result.target_eos = opened.target_model, tuple(sorted(set(eos)))
        if result.stats.stop_reason != "error" and (drained := await self._close(call, close_msg)) is not None:
            charge_bytes(result.stats, policy, acct, wire_bytes(close_msg.ByteSize()), drained)
        return result

    async def _close(self, call: grpc.aio.StreamStreamCall, close_msg: pb.DeviceMessage) -> int | None:
        """Close a session whose generation is complete; None when the close could not be written,
        else the wire bytes of the answers read after it. Every token is already here: an edge gone
        after its last verdict costs nothing, the result stands."""
        try:
            await self._write(call, close_msg)
        except (EdgeError, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            log.info("the edge went away before the finished session was closed (%s); result kept", exc)
            return None
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            await call.done_writing()  # the close is out; the end of the stream is no more bytes
        # Verdicts of blocks sent ahead past the generation's end are still coming (the edge
        # verifies each before it reads the close), and gRPC gives the stream's status only once
        # they are read: read (and charge) them, each within CLOSE_WAIT_S of the one before. The
        # status is waited for so that the cancel that frees the call (`_session`) does not race
        # the close (the edge would end a finished session as CANCELLED in its log and metrics).
        drained = 0
        with contextlib.suppress(Exception):
            while (msg := await within(call.read(), CLOSE_WAIT_S)) is not grpc.aio.EOF:
                drained += wire_bytes(msg.ByteSize()) if msg is not None else 0  # type: ignore[union-attr]
            await within(call.code(), CLOSE_WAIT_S)
        return drained

    def _warn_cap(self, policy: Policy, edge_cap: int) -> None:
        """Once per client: the policy asks for longer blocks than the edge verifies (`fixed-40`,
        `--k-max 64` against its `--max-draft-tokens`); its rounds draft the edge's cap instead."""
        cap = policy.options.k_max  # --k-max (0: none) caps a fixed K too
        asked = (min(policy.k, cap) if cap else policy.k) if isinstance(policy, FixedK) else cap
        if asked > edge_cap and not self._warned_cap:
            why = f"the edge verifies at most {edge_cap} (its --max-draft-tokens): rounds draft {edge_cap}"
            log.warning("--policy %s asks for up to %d drafts a round; %s", policy.name, asked, why)
            self._warned_cap = True

    def _link(self, call: grpc.aio.StreamStreamCall, policy: Policy, opened: SessionInfo) -> Link | None:
        """Send-ahead over this stream when asked for and the edge supports it; else None (an edge
        without it, `max_ahead_rounds` 0, gets local pre-drafting instead)."""
        if policy.options.pipeline != "send-ahead" or policy.edge_streams or policy.local_only:
            return None
        if opened.max_ahead_rounds == 0:
            if not self._warned_ahead:
                log.warning("the edge does not support send-ahead; pre-drafting locally (--pipeline local)")
                self._warned_ahead = True
            return None

        async def send(block: DraftBlock) -> int:
            msg = encode_block(block)
            await self._write(call, msg)
            return wire_bytes(msg.ByteSize())

        async def receive() -> tuple[Verdict, int]:
            down = await self._read(call)
            try:
                return expect_verdict(down), wire_bytes(down.ByteSize())
            except VerifyError as exc:  # received all the same
                exc.bytes_down += wire_bytes(down.ByteSize())
                raise

        return Link(send, receive, min(opened.max_ahead_rounds, policy.options.ahead_blocks), opened.empty_ahead)

    def _streamed(self, call: grpc.aio.StreamStreamCall, max_tokens: int, per_message: int) -> Verify:
        """`ar-edge`: one Generate request, then each (empty) round takes the next streamed token,
        from the message it reads or from one read before that carried several (`split_streamed`)."""
        pending: collections.deque[Verdict] = collections.deque()
        asked = False

        async def verify(block: DraftBlock) -> Exchange:
            nonlocal asked
            if pending:  # rounds run one after another: this one's token came with the last message
                return Exchange(pending.popleft())
            up = 0
            if not asked:
                msg = encode_generate(block.round, max_tokens, per_message)
                await self._write(call, msg)
                asked, up = True, wire_bytes(msg.ByteSize())
            exchange = await self._answer(call, block.round, up, per_message)
            first, *rest = split_streamed(exchange.verdict)
            pending.extend(rest)
            return replace(exchange, verdict=first)

        return verify

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the drafter thread (model forwards never run on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
