// The open-loop generator of openloop.ts, written on node:net: the same
// arrivals, pool of keep-alive connections and client timeout, at a fraction
// of undici's CPU per request. On a 2-core machine a generator that takes
// most of a core competes with the server it measures: at 10 times the
// capacity of a CPU-bound route, undici's used 0.5-1.9 cores.
//
// What it does as a client, as undici does: at most `connections` sockets,
// each with one request at a time (no pipelining); a request waits for a
// free socket when all are busy, and its timeout runs from the moment it
// was sent, queue included; a request that times out on the wire destroys
// its socket (the answer may still come, and must not be taken for the next
// request's); a new socket is opened when a request finds none free and
// fewer than `connections` are open. GET only; an answer without
// Content-Length (chunked, or ended by closing) counts as an error.
import { connect, type Socket } from 'node:net'
import { countAnswer, countTimeout, newCounts, resultOf, sendOnSchedule, watchGenerator, type OpenLoopOptions, type OpenLoopResult } from './openloop.js'

interface Pending {
  /** When it was sent (or queued for a socket): its latency and its timeout count from here. */
  due: number
  bucket: number
  /** The socket it was written to; null while it waits for one. */
  conn: Conn | null
  done: boolean
}

interface Conn {
  socket: Socket
  /** The server closed its side: no request may be written to it. */
  ended: boolean
  current: Pending | null
  buffer: Buffer
}

const HEAD_END = Buffer.from('\r\n\r\n')

export async function openLoopRaw (options: OpenLoopOptions): Promise<OpenLoopResult> {
  const url = new URL(options.url)
  const port = Number(url.port)
  const host = url.hostname
  const requestBytes = Buffer.from(`GET ${url.pathname}${url.search} HTTP/1.1\r\nhost: ${url.host}\r\n\r\n`)
  const counts = newCounts(options)
  let connectionsOpened = 0
  let open = 0
  const idle: Conn[] = []
  // Requests waiting for a socket, and every request not yet done, both in
  // the order they were due: the timeout is the same for all, so the oldest
  // is always the first to time out.
  const waiting: Pending[] = []
  let waitingHead = 0
  const inFlight: Pending[] = []
  let inFlightHead = 0

  const finish = (p: Pending, status: number): void => {
    p.done = true
    p.conn = null
    const elapsed = performance.now() - p.due
    // Timeouts are swept every millisecond or so: an answer past its
    // deadline that came before the sweep is a timeout all the same.
    if (elapsed > options.timeoutMs) countTimeout(counts, p.bucket)
    else countAnswer(counts, p.bucket, status, elapsed, options.timeoutMs)
  }

  const dropIdle = (conn: Conn): void => {
    const i = idle.indexOf(conn)
    if (i !== -1) idle.splice(i, 1)
  }

  const release = (conn: Conn): void => {
    conn.current = null
    // A socket the server closed goes; its 'close' gives a waiting request a new one.
    if (conn.ended || conn.socket.destroyed) {
      conn.socket.destroy()
      return
    }
    const next = takeWaiting()
    if (next !== null) send(conn, next)
    else idle.push(conn)
  }

  const takeWaiting = (): Pending | null => {
    while (waitingHead < waiting.length) {
      const p = waiting[waitingHead++]
      if (waitingHead > 4096 && waitingHead * 2 > waiting.length) {
        waiting.splice(0, waitingHead)
        waitingHead = 0
      }
      if (!p.done) return p
    }
    waiting.length = 0
    waitingHead = 0
    return null
  }

  const onData = (conn: Conn, chunk: Buffer): void => {
    conn.buffer = conn.buffer.length === 0 ? chunk : Buffer.concat([conn.buffer, chunk])
    for (;;) {
      const end = conn.buffer.indexOf(HEAD_END)
      if (end === -1) return
      const head = conn.buffer.toString('latin1', 0, end)
      const status = Number(head.slice(9, 12))
      const length = /\r\ncontent-length:\s*(\d+)/i.exec(head)
      if (length === null && status !== 204 && status !== 304) {
        // A chunked answer, or one ended by closing: not read here. An
        // error, and the socket goes, so that no later answer is misread.
        const p = conn.current
        conn.current = null
        if (p !== null) {
          p.done = true
          p.conn = null
          counts.errors++
        }
        conn.socket.destroy()
        return
      }
      const total = end + HEAD_END.length + (length === null ? 0 : Number(length[1]))
      if (conn.buffer.length < total) return
      conn.buffer = conn.buffer.subarray(total)
      const p = conn.current
      if (p === null) {
        // An answer no request waits for: the socket is out of step.
        dropIdle(conn)
        conn.socket.destroy()
        return
      }
      finish(p, status)
      if (/\r\nconnection:\s*close/i.test(head)) {
        conn.current = null
        conn.socket.destroy()
        return
      }
      release(conn)
    }
  }

  const openConn = (): Conn => {
    open++
    connectionsOpened++
    const socket = connect({ port, host, noDelay: true })
    const conn: Conn = { socket, ended: false, current: null, buffer: Buffer.alloc(0) }
    socket.on('end', () => {
      conn.ended = true
      dropIdle(conn)
    })
    socket.on('data', (chunk: Buffer) => { onData(conn, chunk) })
    socket.on('error', () => {})
    socket.on('close', () => {
      open--
      dropIdle(conn)
      const p = conn.current
      conn.current = null
      if (p !== null && !p.done) {
        p.done = true
        p.conn = null
        counts.errors++
      }
      // A request still waiting for a socket gets a new one.
      if (waitingHead < waiting.length && open < options.connections) {
        const next = takeWaiting()
        if (next !== null) send(openConn(), next)
      }
    })
    return conn
  }

  const send = (conn: Conn, p: Pending): void => {
    conn.current = p
    p.conn = conn
    conn.socket.write(requestBytes)
  }

  const fire = (bucket: number, due: number): void => {
    const p: Pending = { due, bucket, conn: null, done: false }
    inFlight.push(p)
    const conn = idle.pop()
    if (conn !== undefined) send(conn, p)
    else if (open < options.connections) send(openConn(), p)
    else waiting.push(p)
  }

  // One check for timeouts every few ms instead of a timer per request.
  const expire = (now: number): void => {
    while (inFlightHead < inFlight.length) {
      const p = inFlight[inFlightHead]
      if (!p.done && now - p.due < options.timeoutMs) break
      inFlightHead++
      if (p.done) continue
      p.done = true
      countTimeout(counts, p.bucket)
      // On the wire: its answer may still come, so the socket goes (as undici does).
      if (p.conn !== null && p.conn.current === p) {
        p.conn.current = null
        p.conn.socket.destroy()
      }
      p.conn = null
    }
    if (inFlightHead > 4096 && inFlightHead * 2 > inFlight.length) {
      inFlight.splice(0, inFlightHead)
      inFlightHead = 0
    }
  }

  const stop = watchGenerator()
  await sendOnSchedule(options, counts, fire, expire)
  // Every request still open ends by its answer or its timeout.
  while (inFlightHead < inFlight.length) {
    expire(performance.now())
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
  const generator = stop()
  for (const conn of idle.splice(0)) conn.socket.destroy()
  return resultOf(options, counts, connectionsOpened, generator)
}
