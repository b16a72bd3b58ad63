// Fleet-wide limits: three server processes share a group of 20 through
// Redis, in front of a downstream that counts the calls it serves at once.
// Open loop at a multiple of capacity, round-robin over the instances; then
// one instance is killed (SIGKILL) with permits held; then Redis is killed
// and restarted, once per onStoreError mode.
import { fork, spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { Redis } from 'ioredis'
import { Agent, request } from 'undici'
import type { OnStoreError, PoolStats } from 'fastify-concurrency-limit'
import { machine, progress, round } from '../lab.js'
import type { ScenarioResult, Table } from '../report.js'
import { summarize, type Latency } from '../stats.js'
import type { FleetServerSettings } from '../fleet-server.js'

const SERVICE_MS = 100
const LIMIT = 20
const INSTANCES = 3
const LEASE_MS = 2000
const MULTIPLE = 5
const CLIENT_TIMEOUT_MS = 2000
const CAPACITY = LIMIT * 1000 / SERVICE_MS

/** True if redis-server can be started from PATH (the scenario needs one). */
export function redisServerAvailable (): boolean {
  const probe = spawnSync('redis-server', ['--version'], { stdio: 'ignore' })
  return probe.error === undefined && probe.status === 0
}

const serverPath = fileURLToPath(new URL('../fleet-server.js', import.meta.url))
const downstreamPath = fileURLToPath(new URL('../fleet-downstream.js', import.meta.url))

async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => { resolve(port) })
    })
  })
}

/** A child process spoken to over IPC ('ready' with a port, then requests by type). */
class Child {
  readonly process: ChildProcess
  readonly port: number

  private constructor (child: ChildProcess, port: number) {
    this.process = child
    this.port = port
  }

  static async fork (path: string, args: string[]): Promise<Child> {
    const child = fork(path, args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    const [message] = await once(child, 'message') as [{ port: number }]
    return new Child(child, message.port)
  }

  get origin (): string {
    return `http://127.0.0.1:${this.port}`
  }

  async ask<T> (type: string): Promise<T> {
    this.process.send({ type })
    for (;;) {
      const [message] = await once(this.process, 'message') as [{ type: string } & T]
      if (message.type === type) return message
    }
  }

  async stop (signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    if (this.process.exitCode !== null || this.process.signalCode !== null) return
    const exited = once(this.process, 'exit')
    this.process.kill(signal)
    await exited
  }
}

class RedisServer {
  #process: ChildProcess | null = null
  readonly port: number
  readonly dir: string

  constructor (port: number, dir: string) {
    this.port = port
    this.dir = dir
  }

  async start (): Promise<void> {
    this.#process = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--dir', this.dir, '--save', '', '--appendonly', 'no', '--loglevel', 'warning'], { stdio: ['ignore', 'ignore', 'inherit'] })
    const probe = new Redis({ port: this.port, host: '127.0.0.1', lazyConnect: true, retryStrategy: () => null, maxRetriesPerRequest: 0 })
    probe.on('error', () => {})
    try {
      for (let i = 0; ; i++) {
        try {
          await probe.connect()
          await probe.ping()
          return
        } catch (err) {
          if (i > 200) throw err
          probe.disconnect()
          await sleep(25)
        }
      }
    } finally {
      probe.disconnect()
    }
  }

  async kill (): Promise<void> {
    const child = this.#process
    this.#process = null
    if (child === null || child.exitCode !== null) return
    const exited = once(child, 'exit')
    child.kill('SIGKILL')
    await exited
  }
}

interface LoadResult {
  offered: number
  ok: number
  /** 2xx answered before the load stopped, per second of load. */
  goodputPerS: number
  /** 503s by error code. */
  refused: Record<string, number>
  timeouts: number
  errors: number
  latencyOk: Latency
  /** Event-loop delay p99 of the generator: far above its 1 ms tick, it sent late. */
  generatorLagP99Ms: number
}

/**
 * Poisson arrivals at `rate`/s for `durationS`, each sent to the next of
 * `origins()` in turn, with a client timeout. `at` runs actions at given
 * seconds into the run (a kill, a restart).
 */
async function openLoop (origins: () => string[], rate: number, durationS: number, at: Array<[number, () => Promise<void>]> = []): Promise<LoadResult> {
  const agent = new Agent({ connections: 1024, pipelining: 1, keepAliveTimeout: 10_000 })
  const result: LoadResult = { offered: 0, ok: 0, goodputPerS: 0, refused: {}, timeouts: 0, errors: 0, latencyOk: { p50: 0, p99: 0, max: 0 }, generatorLagP99Ms: 0 }
  const lag = monitorEventLoopDelay({ resolution: 5 })
  lag.enable()
  let okInWindow = 0
  const latencies: number[] = []
  const pending = new Set<Promise<void>>()
  const actions: Array<Promise<void>> = []
  const todo = [...at].sort((a, b) => a[0] - b[0])
  let turn = 0
  const start = performance.now()
  let next = start
  for (;;) {
    const now = performance.now()
    const elapsedS = (now - start) / 1000
    if (elapsedS >= durationS) break
    while (todo.length > 0 && todo[0][0] <= elapsedS) actions.push((todo.shift() as [number, () => Promise<void>])[1]())
    while (next <= now) {
      const list = origins()
      const origin = list[turn++ % list.length]
      result.offered++
      const sent = performance.now()
      const p = request(`${origin}/render`, { dispatcher: agent, signal: AbortSignal.timeout(CLIENT_TIMEOUT_MS) }).then(async (res) => {
        const body = await res.body.text()
        const elapsed = performance.now() - sent
        if (res.statusCode === 200) {
          result.ok++
          // Answers after the load stopped drain the queues: not goodput of the window.
          if (performance.now() - start <= durationS * 1000) okInWindow++
          latencies.push(elapsed)
        } else if (res.statusCode === 503) {
          const code = (JSON.parse(body) as { code: string }).code.replace('FST_CONCURRENCY_LIMIT_', '')
          result.refused[code] = (result.refused[code] ?? 0) + 1
        } else {
          result.errors++
        }
      }, (err: Error) => {
        if (err.name === 'TimeoutError' || err.name === 'AbortError') result.timeouts++
        else result.errors++
      }).finally(() => { pending.delete(p) })
      pending.add(p)
      next += -Math.log(1 - Math.random()) * 1000 / rate
    }
    await sleep(1)
  }
  lag.disable()
  result.generatorLagP99Ms = lag.percentile(99) / 1e6
  await Promise.all([...pending, ...actions])
  await agent.destroy()
  result.latencyOk = summarize(latencies)
  result.goodputPerS = okInWindow / durationS
  return result
}

const refusals = (r: LoadResult): string => Object.entries(r.refused).map(([code, n]) => `${code} ${n}`).join(', ') || '0'

export async function fleet (): Promise<ScenarioResult> {
  const dir = mkdtempSync(join(tmpdir(), 'fcl-fleet-'))
  const redisServer = new RedisServer(await freePort(), dir)
  const children: Child[] = []
  const redis = new Redis({ port: redisServer.port, host: '127.0.0.1', retryStrategy: () => 50 })
  redis.on('error', () => {})
  try {
    await redisServer.start()
    const downstream = await Child.fork(downstreamPath, [String(SERVICE_MS)])
    children.push(downstream)
    const startInstances = async (onStoreError: OnStoreError): Promise<Child[]> => {
      const settings: FleetServerSettings = { redisPort: redisServer.port, downstreamPort: downstream.port, maxConcurrency: LIMIT, maxQueue: 50, queueTimeout: 1000, leaseMs: LEASE_MS, onStoreError, instances: INSTANCES }
      const started = await Promise.all(Array.from({ length: INSTANCES }, async () => await Child.fork(serverPath, [JSON.stringify(settings)])))
      children.push(...started)
      return started
    }
    const peak = async (): Promise<number> => (await downstream.ask<{ peak: number }>('stats')).peak
    const reset = async (instances: Child[]): Promise<void> => {
      await downstream.ask('reset')
      await Promise.all(instances.map(async (i) => await i.ask('reset')))
    }

    // 1. Light load (no queueing): what a shared permit adds per admission.
    let instances = await startInstances('refuse')
    let live = instances.map((i) => i.origin)
    await openLoop(() => live, CAPACITY * 0.3, 1) // warm-up
    await reset(instances)
    const light = await openLoop(() => live, CAPACITY * 0.3, 4)
    const admissions = await Promise.all(instances.map(async (i) => (await i.ask<{ admission: Latency }>('stats')).admission))
    const admissionP50 = Math.max(...admissions.map((a) => a.p50))
    const admissionP99 = Math.max(...admissions.map((a) => a.p99))
    const lightPeak = await peak()
    progress(`fleet light load: admission p50 ${round(admissionP50, 2)} ms, p99 ${round(admissionP99, 2)} ms (worst instance)`)

    // 2. Overload: 5x capacity, spread over the three instances.
    await reset(instances)
    const admittedBy = async (): Promise<number[]> => await Promise.all(instances.map(async (i) => (await i.ask<{ pool: PoolStats }>('stats')).pool.admitted))
    const admittedBefore = await admittedBy()
    const heavy = await openLoop(() => live, CAPACITY * MULTIPLE, 6)
    const share = (await admittedBy()).map((n, i) => n - admittedBefore[i])
    const heavyPeak = await peak()
    const goodputPct = 100 * heavy.goodputPerS / CAPACITY
    progress(`fleet ${MULTIPLE}x: goodput ${round(goodputPct)}% of ${CAPACITY}/s, downstream peak ${heavyPeak}, 503 ${refusals(heavy)}, timeouts ${heavy.timeouts}, admitted per instance ${share.join(' / ')}, generator lag p99 ${round(heavy.generatorLagP99Ms)} ms`)

    // 3. One instance killed (SIGKILL) with permits held, under the same load
    // on the two others: how long until the permits it held are free again.
    await reset(instances)
    let killedLeases = 0
    let freedAfterMs = -1
    const watch = async (): Promise<void> => {
      // The instance that holds the most permits now.
      const leases = await Promise.all(instances.map(async (i) => (await i.ask<{ pool: PoolStats }>('stats')).pool.store?.leases ?? 0))
      const victim = instances[leases.indexOf(Math.max(...leases))]
      const held = new Set(await redis.zrange('fastify-concurrency-limit:renders', 0, -1))
      await victim.stop('SIGKILL')
      const killedAt = performance.now()
      live = instances.filter((i) => i !== victim).map((i) => i.origin)
      // Leases held at the kill that other instances release within a
      // service time; what is left after that is the dead instance's.
      await sleep(SERVICE_MS * 3)
      const left = new Set((await redis.zrange('fastify-concurrency-limit:renders', 0, -1)).filter((id) => held.has(id)))
      killedLeases = left.size
      while (performance.now() - killedAt < LEASE_MS * 3) {
        const now = new Set(await redis.zrange('fastify-concurrency-limit:renders', 0, -1))
        if (![...left].some((id) => now.has(id))) {
          freedAfterMs = performance.now() - killedAt
          return
        }
        await sleep(10)
      }
    }
    const killed = await openLoop(() => live, CAPACITY * MULTIPLE, 1 + LEASE_MS / 1000 + 2, [[1, watch]])
    const killPeak = await peak()
    progress(`fleet kill -9: ${killedLeases} leases of the killed instance free ${round(freedAfterMs, 0)} ms later (leaseMs ${LEASE_MS}); downstream peak ${killPeak}`)
    await Promise.all(instances.map(async (i) => await i.stop()))

    // 4. Redis killed and restarted (1 s down, losing every lease) under the
    // same load, once per onStoreError mode, three fresh instances each.
    const restarts: Array<{ mode: OnStoreError, result: LoadResult, peak: number, pools: PoolStats[] }> = []
    for (const mode of ['refuse', 'allow', 'local'] as const) {
      instances = await startInstances(mode)
      live = instances.map((i) => i.origin)
      await openLoop(() => live, CAPACITY, 0.5)
      await reset(instances)
      const result = await openLoop(() => live, CAPACITY * MULTIPLE, 5, [
        [1, async () => { await redisServer.kill() }],
        [2, async () => { await redisServer.start() }]
      ])
      const pools = await Promise.all(instances.map(async (i) => (await i.ask<{ pool: PoolStats }>('stats')).pool))
      restarts.push({ mode, result, peak: await peak(), pools })
      progress(`fleet Redis restart, ${mode}: goodput ${round(100 * result.goodputPerS / CAPACITY)}%, downstream peak ${restarts[restarts.length - 1].peak}, 503 ${refusals(result)}, timeouts ${result.timeouts}`)
      await Promise.all(instances.map(async (i) => await i.stop()))
    }

    const tables: Table[] = [{
      title: `Fleet: ${INSTANCES} instances share a group of ${LIMIT} through Redis (leaseMs ${LEASE_MS}); downstream service time ${SERVICE_MS} ms, capacity ${CAPACITY}/s; open loop, ${CLIENT_TIMEOUT_MS} ms client timeout`,
      columns: ['phase', 'offered/s', 'goodput % of capacity', 'downstream peak (target <= 20)', '503 by code', 'timeouts', 'errors', 'p50 2xx ms', 'p99 2xx ms'],
      rows: [
        ['0.3x', round(light.offered / 4, 0), round(100 * light.goodputPerS / CAPACITY), lightPeak, refusals(light), light.timeouts, light.errors, round(light.latencyOk.p50), round(light.latencyOk.p99)],
        [`${MULTIPLE}x`, round(heavy.offered / 6, 0), round(goodputPct), heavyPeak, refusals(heavy), heavy.timeouts, heavy.errors, round(heavy.latencyOk.p50), round(heavy.latencyOk.p99)],
        [`${MULTIPLE}x, one instance killed at 1 s`, round(killed.offered / (3 + LEASE_MS / 1000), 0), round(100 * killed.goodputPerS / CAPACITY), killPeak, refusals(killed), killed.timeouts, killed.errors, round(killed.latencyOk.p50), round(killed.latencyOk.p99)],
        ...restarts.map(({ mode, result, peak }) => [`${MULTIPLE}x, Redis down 1-2 s, onStoreError '${mode}'`, round(result.offered / 5, 0), round(100 * result.goodputPerS / CAPACITY), peak, refusals(result), result.timeouts, result.errors, round(result.latencyOk.p50), round(result.latencyOk.p99)])
      ]
    }, {
      title: 'Fleet: admission cost and a killed instance',
      columns: ['measure', 'value', 'target'],
      rows: [
        ['admission p50 at 0.3x (onRequest to handler, worst instance)', `${round(admissionP50, 2)} ms`, '<= 1 ms'],
        ['admission p99 at 0.3x', `${round(admissionP99, 2)} ms`, ''],
        [`requests admitted per instance at ${MULTIPLE}x (equal load each)`, share.join(' / '), 'about equal'],
        [`load generator's event-loop delay p99 at ${MULTIPLE}x`, `${round(heavy.generatorLagP99Ms)} ms`, 'near 1 ms: it sent on time'],
        ['leases of the killed instance', killedLeases, ''],
        ['their permits free again after', freedAfterMs < 0 ? 'not within the run' : `${round(freedAfterMs, 0)} ms`, `<= leaseMs + 1 s = ${LEASE_MS + 1000} ms`]
      ]
    }]
    return {
      scenario: 'fleet',
      title: 'Fleet-wide limits (Redis)',
      options: { serviceTime: SERVICE_MS, limit: LIMIT, instances: INSTANCES, leaseMs: LEASE_MS, multiple: MULTIPLE, clientTimeout: CLIENT_TIMEOUT_MS },
      machine,
      tables,
      charts: [],
      data: { light, heavy, share, killed, killedLeases, freedAfterMs, admissions, restarts: restarts.map(({ mode, result, peak, pools }) => ({ mode, result, peak, store: pools.map((p) => p.store) })) }
    }
  } finally {
    redis.disconnect()
    await Promise.all(children.map(async (c) => await c.stop()))
    await redisServer.kill()
    rmSync(dir, { recursive: true, force: true })
  }
}
