import cluster, { type Worker } from 'node:cluster'
import { EventEmitter } from 'node:events'
import type { Cut } from './drain.js'
import { PORT_ENV, TAG, isMessage, type PrimaryMessage, type RecycleReason, type WorkerMessage } from './messages.js'
import type { ResolvedClusterOptions } from './options.js'

export type WorkerState = 'starting' | 'serving' | 'draining'

export interface WorkerStats {
  /** The cluster's id of the worker (`cluster.worker.id`). */
  id: number
  pid: number
  state: WorkerState
  /** Requests received, as of its last report. */
  requests: number
  /** Requests after which it is recycled (maxRequests plus its jitter); null: never. */
  requestLimit: number | null
  /** Resident set size in bytes, as of its last report (every statsInterval). */
  rssBytes: number
  /** Requests received and not yet answered, as of its last report. */
  inFlight: number
  /** Date.now() when it was forked. */
  startedAt: number
}

export interface ClusterStats {
  workers: WorkerStats[]
  /** Workers listening and not draining. */
  serving: number
  /** Workers replaced since the start, by reason. */
  recycles: Record<RecycleReason, number>
  /** Drains that ran past drainTimeout, and what they cut. */
  cut: Cut & { drains: number }
}

export interface RecycleEvent {
  reason: RecycleReason
  /** The worker replaced. */
  pid: number
  /** Its RSS and request count at its last report. */
  rssBytes: number
  requests: number
}

/** The primary's handle on the cluster. */
export interface Cluster extends EventEmitter {
  /** The port the workers share (with `listen.port: 0`, the one the system gave). */
  readonly port: number | null
  /** The addresses the workers listen on, as Fastify prints them. */
  readonly address: string | null
  stats (): ClusterStats
  /** Drains every worker and resolves once all have exited. SIGTERM and SIGINT do this, then exit 0. */
  close (): Promise<void>
  on (event: 'recycle', listener: (event: RecycleEvent) => void): this
  on (event: string | symbol, listener: (...args: any[]) => void): this
}

interface Slot {
  worker: Worker
  pid: number
  state: WorkerState
  requests: number
  requestLimit: number | null
  rssBytes: number
  inFlight: number
  startedAt: number
  /** The worker this one is started to replace, until it listens. */
  replaces: Slot | null
  /** Date.now() when it began to listen; null before. */
  listenedAt: number | null
  /** Why this worker is being replaced, once it asked to be. */
  reason: Exclude<RecycleReason, 'crash'> | null
  killTimer: NodeJS.Timeout | null
  error: string | null
  killed: boolean
}

// A worker that dies sooner than this after it began to listen (or before)
// is part of a crash loop: the next replacement waits, twice as long each time.
const CRASH_LOOP_MS = 10_000
const FIRST_BACKOFF_MS = 500
const MAX_BACKOFF_MS = 30_000
// A worker cuts its drain at drainTimeout, then runs the app's onClose hooks:
// this long after, it is killed.
const KILL_GRACE_MS = 2000

function mib (bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`
}

function seconds (ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`
}

export class Supervisor extends EventEmitter implements Cluster {
  port: number | null = null
  address: string | null = null
  readonly #options: ResolvedClusterOptions
  readonly #slots = new Set<Slot>()
  readonly #recycles: Record<RecycleReason, number> = { requests: 0, memory: 0, crash: 0 }
  readonly #cut = { drains: 0, inFlight: 0, idle: 0 }
  readonly #queue: Slot[] = []
  readonly #timers = new Set<NodeJS.Timeout>()
  /** The worker being replaced: one at a time. */
  #recycling: Slot | null = null
  #crashStreak = 0
  #pinned = false
  #loggedKeepAlive = false
  #startup: { resolve: () => void, reject: (error: Error) => void } | null = null
  #closing: Promise<void> | null = null
  #closed: (() => void) | null = null
  readonly #onSignal: (signal: NodeJS.Signals) => void

  readonly #forkWorker: (env: Record<string, string>) => Worker

  /** `fork` stands in for cluster.fork() in tests. */
  constructor (options: ResolvedClusterOptions, fork: (env: Record<string, string>) => Worker = (env) => cluster.fork(env)) {
    super()
    this.#options = options
    this.#forkWorker = fork
    this.#onSignal = (signal) => {
      options.logger.info(`${signal}: draining ${this.#slots.size} worker${this.#slots.size === 1 ? '' : 's'}`)
      this.close().then(() => process.exit(0))
    }
  }

  /** Forks the workers; resolves once all listen. */
  start (): Promise<void> {
    process.on('SIGTERM', this.#onSignal)
    process.on('SIGINT', this.#onSignal)
    return new Promise((resolve, reject) => {
      this.#startup = { resolve, reject }
      for (let i = 0; i < this.#options.workers; i++) this.#fork(null)
    })
  }

  stats (): ClusterStats {
    const workers = [...this.#slots].map((slot) => ({
      id: slot.worker.id,
      pid: slot.pid,
      state: slot.state,
      requests: slot.requests,
      requestLimit: slot.requestLimit,
      rssBytes: slot.rssBytes,
      inFlight: slot.inFlight,
      startedAt: slot.startedAt
    }))
    return {
      workers,
      serving: workers.filter((worker) => worker.state === 'serving').length,
      recycles: { ...this.#recycles },
      cut: { ...this.#cut }
    }
  }

  close (): Promise<void> {
    if (this.#closing !== null) return this.#closing
    this.#closing = new Promise((resolve) => { this.#closed = resolve })
    for (const timer of this.#timers) clearTimeout(timer)
    this.#timers.clear()
    this.#queue.length = 0
    if (this.#startup !== null) {
      this.#startup.reject(new Error('runCluster: closed before every worker listened'))
      this.#startup = null
    }
    for (const slot of this.#slots) {
      if (slot.state === 'serving') this.#drain(slot)
      else if (slot.state === 'starting') this.#kill(slot)
    }
    this.#checkClosed()
    return this.#closing
  }

  #fork (replaces: Slot | null): void {
    // The workers share the primary's listening handle while one of them
    // has it open. Were every worker gone at once, the next one would open a
    // new one: with listen.port 0, on another port. From then on, each
    // worker is told the port the first one got.
    if (this.#options.listen.port === 0 && this.port !== null && ![...this.#slots].some((slot) => slot.state === 'serving')) this.#pinned = true
    const worker = this.#forkWorker(this.#pinned ? { [PORT_ENV]: String(this.port) } : {})
    const slot: Slot = {
      worker,
      pid: worker.process.pid as number,
      state: 'starting',
      requests: 0,
      requestLimit: null,
      rssBytes: 0,
      inFlight: 0,
      startedAt: Date.now(),
      replaces,
      listenedAt: null,
      reason: null,
      killTimer: null,
      error: null,
      killed: false
    }
    this.#slots.add(slot)
    worker.on('message', (message: unknown) => {
      if (isMessage<WorkerMessage>(message)) this.#onMessage(slot, message)
    })
    worker.on('exit', (code: number | null, signal: NodeJS.Signals | null) => { this.#onExit(slot, code, signal) })
  }

  #onMessage (slot: Slot, message: WorkerMessage): void {
    const log = this.#options.logger
    switch (message.type) {
      case 'listening': {
        // Killed while it started (a close), its word was on its way.
        if (slot.killed) break
        slot.state = 'serving'
        slot.listenedAt = Date.now()
        slot.requestLimit = Number.isFinite(message.requestLimit) ? message.requestLimit : null
        this.port = message.port
        this.address = message.address
        if (message.keepAliveCapped !== null && !this.#loggedKeepAlive) {
          this.#loggedKeepAlive = true
          log.info(`workers announce a keep-alive timeout of ${Math.floor(this.#options.drainTimeout / 2)} ms, not ${message.keepAliveCapped} ms: ` +
            'half of drainTimeout, so that clients close idle connections before a drain runs out')
        }
        const old = slot.replaces
        if (old !== null) {
          slot.replaces = null
          const reason = old.reason as Exclude<RecycleReason, 'crash'>
          this.#recycles[reason]++
          const why = reason === 'memory' ? `RSS ${mib(old.rssBytes)} > maxRssMb` : `${old.requests} requests`
          log.info(`worker ${old.worker.id} (pid ${old.pid}) recycled after ${seconds(Date.now() - old.startedAt)} (${why}): ` +
            `worker ${slot.worker.id} (pid ${slot.pid}) listens, draining the old one`)
          this.#drain(old)
          this.emit('recycle', { reason, pid: old.pid, rssBytes: old.rssBytes, requests: old.requests } satisfies RecycleEvent)
        }
        if (this.#startup !== null && this.stats().serving >= this.#options.workers) {
          this.#startup.resolve()
          this.#startup = null
        }
        break
      }
      case 'failed':
        slot.error = message.error
        log.error(`worker ${slot.worker.id} (pid ${slot.pid}) failed to start: ${message.error}`)
        break
      case 'stats':
        slot.rssBytes = message.rss
        slot.requests = message.requests
        slot.inFlight = message.inFlight
        break
      case 'recycle':
        if (slot.state !== 'serving' || slot.reason !== null || this.#closing !== null) break
        slot.reason = message.reason
        this.#queue.push(slot)
        this.#next()
        break
      case 'drained':
        // Its listening handle's close, sent before this, has been read: no
        // connection goes to it any more.
        this.#tell(slot, 'exit')
        break
      case 'cut':
        this.#cut.drains++
        this.#cut.inFlight += message.cut.inFlight
        this.#cut.idle += message.cut.idle
        log.warn(`worker ${slot.worker.id} (pid ${slot.pid}) still draining after drainTimeout (${this.#options.drainTimeout} ms): ` +
          `cut ${message.cut.inFlight} request${message.cut.inFlight === 1 ? '' : 's'} in flight and ` +
          `${message.cut.idle} idle connection${message.cut.idle === 1 ? '' : 's'}`)
        break
    }
  }

  /** Starts the next recycle in the queue, unless one is under way. */
  #next (): void {
    while (this.#recycling === null && this.#queue.length > 0) {
      const slot = this.#queue.shift() as Slot
      if (slot.state !== 'serving' || !this.#slots.has(slot)) continue
      this.#recycling = slot
      this.#fork(slot)
    }
  }

  #drain (slot: Slot): void {
    slot.state = 'draining'
    this.#tell(slot, 'drain')
    slot.killTimer = setTimeout(() => {
      this.#options.logger.warn(`worker ${slot.worker.id} (pid ${slot.pid}) did not exit ${KILL_GRACE_MS} ms after drainTimeout: killing it`)
      this.#kill(slot)
    }, this.#options.drainTimeout + KILL_GRACE_MS)
  }

  #tell (slot: Slot, type: PrimaryMessage['type']): void {
    // A worker can be gone before its exit is seen here. Sent without a
    // callback, the message's error would be thrown by the worker's
    // 'error' event and end the primary; its exit is handled below.
    slot.worker.send({ tag: TAG, type } satisfies PrimaryMessage, undefined, undefined, () => {})
  }

  #kill (slot: Slot): void {
    slot.killed = true
    slot.worker.process.kill('SIGKILL')
  }

  #onExit (slot: Slot, code: number | null, signal: NodeJS.Signals | null): void {
    const log = this.#options.logger
    this.#slots.delete(slot)
    if (slot.killTimer !== null) clearTimeout(slot.killTimer)
    const how = signal === null ? `exited with code ${code}` : `was killed by ${signal}`
    if (slot.state === 'draining') {
      if (code !== 0 && !slot.killed) log.warn(`worker ${slot.worker.id} (pid ${slot.pid}) ${how} while draining`)
      if (this.#recycling === slot) this.#recycling = null
      this.#next()
      this.#checkClosed()
      return
    }
    if (this.#closing !== null) {
      this.#checkClosed()
      return
    }
    if (this.#startup !== null && slot.state === 'starting') {
      // A worker that cannot start at all (the factory throws, the port is
      // taken) would only crash again: stop and say why.
      this.#startup.reject(new Error(`runCluster: worker ${slot.worker.id} (pid ${slot.pid}) ${how} before it listened` +
        (slot.error === null ? '' : `: ${slot.error.split('\n')[0]}`)))
      this.#startup = null
      this.close()
      return
    }
    this.#recycles.crash++
    const lived = Date.now() - slot.startedAt
    // A loop: it never listened, or it crashed soon after it did.
    const served = slot.listenedAt === null ? 0 : Date.now() - slot.listenedAt
    this.#crashStreak = served < CRASH_LOOP_MS ? this.#crashStreak + 1 : 1
    const delay = this.#crashStreak === 1 ? 0 : Math.min(FIRST_BACKOFF_MS * 2 ** (this.#crashStreak - 2), MAX_BACKOFF_MS)
    // A replacement that crashed before it listened: the worker it was to
    // replace still serves, and a new replacement is started for it.
    let replaces = slot.replaces
    if (this.#recycling === slot) {
      // The worker waiting for its replacement crashed first: that
      // replacement takes its place and nothing else has to start.
      this.#recycling = null
      for (const other of this.#slots) if (other.replaces === slot) other.replaces = null
      log.error(`worker ${slot.worker.id} (pid ${slot.pid}) ${how} after ${seconds(lived)}; its replacement is starting`)
      this.emit('recycle', { reason: 'crash', pid: slot.pid, rssBytes: slot.rssBytes, requests: slot.requests } satisfies RecycleEvent)
      this.#next()
      return
    }
    if (replaces !== null && replaces.state !== 'serving') replaces = null
    log.error(`worker ${slot.worker.id} (pid ${slot.pid}) ${how} after ${seconds(lived)}; ` +
      (delay === 0 ? 'starting a replacement' : `starting a replacement in ${delay} ms (crash ${this.#crashStreak} in a row: backing off)`))
    this.emit('recycle', { reason: 'crash', pid: slot.pid, rssBytes: slot.rssBytes, requests: slot.requests } satisfies RecycleEvent)
    const timer = setTimeout(() => {
      this.#timers.delete(timer)
      this.#fork(replaces)
    }, delay)
    this.#timers.add(timer)
  }

  #checkClosed (): void {
    if (this.#closing === null || this.#slots.size > 0 || this.#closed === null) return
    process.removeListener('SIGTERM', this.#onSignal)
    process.removeListener('SIGINT', this.#onSignal)
    this.#closed()
    this.#closed = null
  }
}
