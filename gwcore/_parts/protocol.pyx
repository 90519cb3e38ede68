# The per-request hot path of the HTTP front end: gwcore/http.py builds its listener state and
# connection protocol on these two classes and keeps everything that is not a plain accepted
# submit (built-in endpoints, refusals, JSONP, the worker protocol, timeouts) in Python.
#
# What runs here for each submit: the parser's events are walked, the answer slot is made, the
# envelope goes to the writer, and when its batch is durable the writer calls the slot, which
# puts the cached "200 OK" in place and writes every answer that is now next in line. No Python
# function frame is entered on that path; the rare branches call the Python methods by name.

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC, CLOCK_REALTIME
from libc.time cimport time as c_time, time_t

import collections as _collections
import email.utils as _email_utils

cdef object _formatdate = _email_utils.formatdate
cdef object _OrderedDict = _collections.OrderedDict


cdef enum:
    JOB_INGEST = 0                   # gwcore.store's job kinds
    JOB_ACK = 1
    JOB_CALL = 2

JOB_KINDS = (JOB_INGEST, JOB_ACK, JOB_CALL)


# Request durations (gwcore_http_request_seconds): the bounds of gwcore.metrics.SECONDS, and the
# kinds of request a slot can be (its call_type label, REQUEST_KINDS in that order).
cdef enum:
    N_SECONDS = 14
cdef double _SECONDS[N_SECONDS]
_SECONDS[:] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
DURATION_BOUNDS = tuple(_SECONDS[i] for i in range(N_SECONDS))
cdef enum:
    KIND_SUBMIT = 0
    KIND_DATABUS = 1
    KIND_BATCH = 2
    KIND_WORKER = 3
    KIND_OTHER = 4
REQUEST_KINDS = ("submit", "databus", "batch", "worker", "other")


cdef inline double _monotonic() noexcept:
    """time.monotonic(), without a Python call."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline uint64_t _now_ms() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>(ts.tv_nsec // 1000000)


cdef class ListenerCore:
    """What every connection of one listener shares and reads per request (the C half of
    ``gwcore.http.HTTPState``)."""

    cdef public bint active          # may take gateway traffic (not a standby/passive/starting node)
    cdef public bint passive         # a passive node waiting for the data dir's lease
    cdef public bint draining        # shutting down: answer 503, close when idle
    cdef public object writer        # ingest_then(envelope, done) and .pending
    cdef public JobInbox inbox       # the writer's inbox, when it has one (the compiled path)
    cdef public object verifier      # request signatures, or None
    cdef public Py_ssize_t max_pipeline
    cdef public Py_ssize_t max_pending
    cdef public unsigned long long answered_ok   # 200s of the fast path (the rest: requests_by_status)
    cdef public unsigned long long compiled_submits   # submits handed to the inbox without Python
    cdef public unsigned long long bytes_in    # received on this listener's connections
    cdef public unsigned long long bytes_out   # answers written (streamed files aside)
    # the durations of the compiled path's answers (accepted submits, 200): counts per bound of
    # _SECONDS and above them all, and their sum; every other answer is observed in Python
    cdef unsigned long long _ok_counts[N_SECONDS + 1]
    cdef double _ok_sum
    # The connections with nothing to do (no request begun, no answer owed), the one idle the
    # longest first: at GWCORE_HTTP_MAX_CONNECTIONS the first one is closed for a newcomer. An
    # OrderedDict (connection -> None): taking out, putting back at the end, and the first are O(1).
    cdef public object idle_connections
    cdef bytes _date
    cdef bytes _ok
    cdef time_t _date_at

    def __cinit__(self):
        self.idle_connections = _OrderedDict()
        self._date = b""
        self._ok = None                  # rendered on first use and again each new second
        self._date_at = 0

    cdef inline void _observe_ok(self, double seconds) noexcept:
        cdef int i = 0
        while i < N_SECONDS and seconds > _SECONDS[i]:
            i += 1
        self._ok_counts[i] += 1
        self._ok_sum += seconds

    def observe_ok(self, double started):
        """Count a 200 to a submit answered outside the compiled path, *started* as a slot's."""
        self._observe_ok(_monotonic() - started)

    def ok_durations(self):
        """``(counts, sum)`` of the 200s to submits: counts per bound of ``DURATION_BOUNDS``,
        then above them all."""
        return [self._ok_counts[i] for i in range(N_SECONDS + 1)], self._ok_sum

    cpdef bytes date(self):
        """The HTTP Date value of this second (formatted once a second)."""
        cdef time_t now = c_time(NULL)
        if now != self._date_at:
            self._date_at = now
            self._date = _formatdate(now, usegmt=True).encode("ascii")
            self._ok = None
        return self._date

    cpdef bytes ok(self):
        """The complete answer to an accepted submit: 200, body ``OK`` (cached per second)."""
        cdef bytes date = self.date()
        if self._ok is None:
            self._ok = self.render_ok(date)
        return self._ok

    def render_ok(self, bytes date):
        raise NotImplementedError


cdef class AnswerSlot:
    """One request's place in its connection's answer order. The writer calls it with the
    outcome of the request's envelope, ``slot(ok, value)``, on the loop thread."""

    cdef public object data          # the answer's bytes, once known
    cdef public bint close           # close the connection after this answer
    cdef public object callback      # JSONP callback name, or None
    cdef public ConnectionCore protocol
    cdef public str msg_id
    cdef public bint head            # a HEAD request: headers only
    cdef public double started       # monotonic time of the read that completed its request (or head)
    cdef public int kind             # KIND_*: its call_type label

    def __call__(self, bint ok, value):
        cdef ConnectionCore proto = self.protocol
        if ok and value is True and self.callback is None:
            proto.state.answered_ok += 1
            proto.state._observe_ok(_monotonic() - self.started)
            self.data = proto.state.ok()
            proto._flush()
        else:
            proto._ingested(self, ok, value)


cdef class ConnectionCore:
    """One client connection: the C half of ``gwcore.http.HTTPProtocol``."""

    cdef public ListenerCore state
    cdef public RequestParser parser
    cdef public object transport
    cdef public object slots         # collections.deque of AnswerSlot
    cdef public object loop
    cdef public bint closing         # no further requests will be read
    cdef public bint reading_paused
    cdef public bint writing_paused
    cdef public double request_started   # loop time the unfinished request's first bytes came
    cdef public unsigned long long request_bytes   # bytes received of it (what the minimum rate counts)
    cdef public bint idle_listed     # in state.idle_connections
    cdef public double idle_since
    cdef public double linger_until
    cdef public object part          # the databus part being received (gwcore.databus.intake._Part), or None
    cdef public int parts_open       # parts of this connection received and not yet recorded
    cdef double _read_at             # monotonic time of the read being handled

    @property
    def in_request(self):
        return self.parser.in_request

    @property
    def in_head(self):
        """The unfinished request's line and headers are not all in yet."""
        return self.parser.in_request and self.parser._state <= RP_HEADERS

    cdef inline int _went_idle(self) except -1:
        # Nothing begun, nothing owed: the connection may be closed for a newcomer (HTTPState).
        if not self.idle_listed and not self.closing and self.transport is not None:
            self.idle_listed = True
            self.state.idle_connections[self] = None
        return 0

    cdef inline int _went_busy(self) except -1:
        if self.idle_listed:
            self.idle_listed = False
            self.state.idle_connections.pop(self, None)
        return 0

    def mark_idle(self, bint idle):
        """List the connection among the listener's idle ones, or take it out (the Python side's
        way to the same bookkeeping the compiled path does: a new connection, a lost one)."""
        if idle:
            self._went_idle()
        else:
            self._went_busy()

    def data_received(self, data):
        cdef RequestParser parser = self.parser
        cdef list events
        cdef tuple event
        cdef int kind
        cdef bint was_in_request, ended = False
        if self.closing:
            return
        if self.idle_listed:
            self._went_busy()
        was_in_request = parser.in_request
        self._read_at = _monotonic()
        self.state.bytes_in += len(data)
        events = parser.feed(data, _now_ms())
        for event in events:
            kind = event[0]
            if kind == EVENT_SUBMIT:
                ended = True
                self._submit(event[1], event[2])
            elif kind == EVENT_PART_DATA:
                self._part_data(event[1])
            elif kind == EVENT_OTHER:
                ended = True
                self._other(event[1], event[2], event[3], event[4])
            elif kind == EVENT_PART_BEGIN:
                self._part_begin(event[1], event[2])
            elif kind == EVENT_PART_END:
                ended = True
                self._part_end()
            elif kind == EVENT_CONTINUE:
                if not self.slots and self.transport is not None:
                    # .NET WebRequest (NServiceBus Gateway <= 3.x) sends "Expect: 100-continue"
                    # and waits up to 350 ms before sending the body anyway. With earlier requests
                    # unanswered an interim response would jump the queue, so then stay silent.
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                self._fail(event[1], event[2])
            if self.closing:
                return
        if parser.in_request:
            # A request's deadline counts from its first bytes (GWCORE_HTTP_REQUEST_TIMEOUT, then
            # GWCORE_HTTP_MIN_RATE: HTTPProtocol.check_timeouts); what comes later never moves it.
            if ended:
                # it began in this read, after the end of the one before (its bytes uncounted)
                self.request_started = self.loop.time()
                self.request_bytes = 0
            elif not was_in_request:
                self.request_started = self.loop.time()
                self.request_bytes = len(data)
            else:
                self.request_bytes += len(data)
        elif not self.slots:
            self._went_idle()
        if self.part is not None:
            # a databus part: its body may be read straight into the blob's buffers from here on
            self._take_part_body()
        self._update_reading()

    cpdef AnswerSlot _slot(self, bint keep_alive):
        cdef AnswerSlot slot = AnswerSlot.__new__(AnswerSlot)
        slot.close = not keep_alive or self.state.draining
        slot.started = self._read_at
        slot.kind = KIND_OTHER
        self.slots.append(slot)
        if slot.close:
            self.closing = True
        return slot

    cdef _submit(self, bint keep_alive, result):
        cdef AnswerSlot slot = self._slot(keep_alive)
        cdef ListenerCore state = self.state
        cdef JobInbox inbox = state.inbox
        cdef Envelope env
        if type(result) is Batch:
            slot.kind = KIND_BATCH
        elif type(result) is Envelope and (<Envelope>result).call_type == CALL_TYPE_DATABUS:
            slot.kind = KIND_DATABUS
        else:
            slot.kind = KIND_SUBMIT
        if (state.draining or not state.active or state.verifier is not None
                or type(result) is not Envelope or (<Envelope>result).call_type != CALL_TYPE_SUBMIT
                or inbox is None or inbox.closed
                or inbox.pending >= state.max_pending or self.parts_open):
            self._route(slot, result)
            return
        env = <Envelope>result
        slot.callback = env.callback
        slot.protocol = self
        slot.msg_id = env.id
        state.compiled_submits += 1
        inbox.put(JOB_INGEST, env, slot)

    def _flush(self):
        slots = self.slots
        transport = self.transport
        cdef AnswerSlot slot
        while slots:
            slot = <AnswerSlot>slots[0]
            if slot.data is None:
                break
            slots.popleft()
            if transport is None or transport.is_closing():
                continue
            transport.write(slot.data)
            self.state.bytes_out += len(slot.data)
            if slot.close:
                slots.clear()
                self._linger(transport)
                return
        if not slots and not self.parser.in_request:
            if (self.closing or self.state.draining) and transport is not None:
                transport.close()
                return
            self.idle_since = self.loop.time()
            self._went_idle()
        self._update_reading()

    def _update_reading(self):
        if self.transport is None or self.closing:
            return
        cdef bint want_pause = self.writing_paused or len(self.slots) >= self.state.max_pipeline
        if not want_pause and self.part is not None:
            # a databus part whose blob threads lag behind the socket (gwcore/databus/sink.py)
            sink = self.part.sink
            want_pause = sink is not None and sink.behind
        if want_pause and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        elif not want_pause and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()


cdef class JobInbox:
    """The loop-thread side of the writer's job queue: jobs (``(kind, payload, done)``) gather
    in a list during one event-loop turn, and the first job of a turn schedules ``hand_over``
    (``loop.call_soon``), which passes the whole list to the writer thread with one wake-up.
    Not thread-safe: the loop thread only."""

    cdef public list outbox          # this turn's jobs
    cdef public Py_ssize_t pending   # jobs added and not yet resolved
    cdef public bint closed          # the writer takes no more jobs
    cdef object _call_soon
    cdef object _hand_over

    def __init__(self, call_soon, hand_over):
        self.outbox = []
        self.pending = 0
        self.closed = False
        self._call_soon = call_soon
        self._hand_over = hand_over

    cdef int put(self, int kind, object payload, object done) except -1:
        self.pending += 1
        if not self.outbox:
            self._call_soon(self._hand_over)
        self.outbox.append((kind, payload, done))
        return 0

    def add(self, int kind, payload, done):
        """Queue one job for the writer (the caller checked ``closed``)."""
        self.put(kind, payload, done)

    def take(self):
        """This turn's jobs, leaving the outbox empty."""
        cdef list jobs = self.outbox
        self.outbox = []
        return jobs

    def resolve(self, list done not None):
        """Call ``done(ok, value)`` of every ``(done, ok, value)`` a committed batch returned."""
        cdef tuple item
        self.pending -= len(done)
        for item in done:
            item[0](item[1], item[2])


# A batch's answer for each message stored: what orjson writes for these dicts, kept as bytes.
cdef bytes _BATCH_NEW = b'{"status":200,"reason":"OK","duplicate":false}'
cdef bytes _BATCH_DUPLICATE = b'{"status":200,"reason":"OK","duplicate":true}'


cdef class BatchAnswer:
    """The outcomes of one batch request's messages, and its answer once the last is decided
    (docs/protocol.md, "Batches between gwcore sites"; gwcore/batch.py).

    Each message is either refused while framing (:meth:`refuse`) or handed to the writer with
    :meth:`slot` as its ``done(ok, value)``: ``value`` True (or anything but False) new and
    stored, False a duplicate, a ``Rejection`` refused, and with ``ok`` false the exception,
    which ``on_error(exc)`` turns into ``(status, reason)``. Once :meth:`arm` was called and no
    message is waiting, ``on_done(body)`` is called once with the answer's JSON,
    ``{"results":[...]}``, byte for byte what ``orjson.dumps`` writes for the same dicts. Loop
    thread only; one small object per message, no closure and no dict for a message stored."""

    cdef list _items          # per message: None waiting, True new, False duplicate, (status, reason)
    cdef Py_ssize_t _waiting
    cdef bint _armed
    cdef bint _answered
    cdef object _on_done
    cdef object _on_error

    def __init__(self, Py_ssize_t messages, on_done, on_error):
        if messages < 0:
            raise ValueError("a batch of a negative number of messages")
        self._items = [None] * messages
        self._on_done = on_done
        self._on_error = on_error

    @property
    def waiting(self):
        """Messages handed to the writer and not decided yet."""
        return self._waiting

    def refuse(self, Py_ssize_t index, int status, str reason not None):
        """Message *index* was refused before the writer (framing, limits)."""
        self._check(index)
        self._items[index] = (status, reason)

    def slot(self, Py_ssize_t index):
        """The ``done(ok, value)`` of message *index*'s writer job."""
        cdef _BatchSlot s
        self._check(index)
        s = _BatchSlot.__new__(_BatchSlot)
        s.answer = self
        s.index = index
        self._waiting += 1
        return s

    def arm(self):
        """Every message was refused or handed over: answer as soon as none is waiting (now, if
        none is)."""
        self._armed = True
        if self._waiting == 0:
            self._finish()

    def results(self):
        """The outcomes as dicts (what the answer's ``results`` holds; None for one waiting)."""
        cdef list out = []
        for item in self._items:
            if item is None:
                out.append(None)
            elif item is True or item is False:
                out.append({"status": 200, "reason": "OK", "duplicate": item is False})
            else:
                out.append({"status": item[0], "reason": item[1]})
        return out

    def body(self):
        """The answer's JSON (every message decided)."""
        cdef list parts = []
        for item in self._items:
            if item is True:
                parts.append(_BATCH_NEW)
            elif item is False:
                parts.append(_BATCH_DUPLICATE)
            elif item is None:
                raise ValueError("a message of the batch is still waiting for the writer")
            else:
                parts.append(orjson.dumps({"status": item[0], "reason": item[1]}))
        return b'{"results":[' + b",".join(parts) + b"]}"

    cdef int _check(self, Py_ssize_t index) except -1:
        if not 0 <= index < len(self._items) or self._items[index] is not None:
            raise ValueError(f"message {index} of the batch: no such message, or decided already")
        return 0

    cdef int _decided(self, Py_ssize_t index, bint ok, object value) except -1:
        cdef Rejection r
        if self._items[index] is not None:
            return 0                      # answered once only
        if not ok:
            status, reason = self._on_error(value)
            self._items[index] = (status, reason)
        elif type(value) is Rejection:
            r = <Rejection>value
            self._items[index] = (r.status, r.reason)
        else:
            self._items[index] = value is not False
        self._waiting -= 1
        if self._waiting == 0 and self._armed:
            self._finish()
        return 0

    cdef int _finish(self) except -1:
        if self._answered:
            return 0
        self._answered = True
        self._on_done(self.body())
        return 0


cdef class _BatchSlot:
    """One message's ``done(ok, value)`` (BatchAnswer.slot)."""
    cdef BatchAnswer answer
    cdef Py_ssize_t index

    def __call__(self, ok, value):
        self.answer._decided(self.index, ok, value)


def ingest_results(list jobs not None, list flags not None):
    """``[(done, True, flag), ...]``: the answers of a batch of ingest jobs only, from the flags
    ``DedupIndex.apply_batch`` returned for their envelopes (True new, False duplicate)."""
    cdef Py_ssize_t i, n = len(jobs)
    cdef list out
    if len(flags) != n:
        raise ValueError(f"{n} jobs but {len(flags)} flags")
    out = [None] * n
    for i in range(n):
        out[i] = ((<tuple>jobs[i])[2], True, flags[i])
    return out
