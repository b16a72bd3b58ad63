import type { FastifyInstance } from 'fastify'
import type * as PromClient from 'prom-client'
import type { ConnectionGuard } from './connection-guard.js'
import { InvalidOptionError } from './errors.js'
import type { LimiterStats } from './limiter.js'
import type { MetricsRegistry } from './options.js'
import type { Pools } from './pools.js'

type Client = typeof PromClient

/** The names after the prefix, with the help text Prometheus shows. */
export const METRICS = {
  in_flight: 'Requests holding a slot of the pool now',
  queued: 'Requests waiting in the pool\'s queue now',
  limit: 'Requests the pool admits at once now (maxConcurrency, or the adaptive limit in force)',
  max_queue: 'Requests the pool\'s queue holds at most now',
  requests_total: 'Requests that asked the pool for a slot, by result: admitted, queue_full, queue_timeout, closing, overloaded, ' +
    'store_unavailable or abandoned (the client left before it got a slot); those still queued are not counted yet',
  priority_requests_total: 'Requests of each priority class, by result: admitted, or rejected (any reason)',
  queue_wait_seconds: 'Time in the queue of the requests admitted from it',
  connections_open: 'Open connections counted against maxConnections',
  connections_refused_total: 'Connections refused over maxConnections'
} as const
export type MetricName = keyof typeof METRICS

const CONNECTION_METRICS: readonly MetricName[] = ['connections_open', 'connections_refused_total']

// Seconds. Waits of a healthy queue are short: the buckets start at 1 ms.
// Each pool's queueTimeout is added: the waits just under it are the ones
// about to be refused.
const WAIT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

// Names taken on a registry by registrations not yet closed: the histogram
// is created only when the app is ready, when every route's pool exists.
const taken = new WeakMap<object, Set<string>>()

/** The stats result of each counted outcome, as `result` label values. */
function results (s: LimiterStats): Array<[string, number]> {
  const counted: Array<[string, number]> = [['admitted', s.admitted]]
  for (const [reason, n] of Object.entries(s.rejected)) counted.push([snakeCase(reason), n])
  counted.push(['abandoned', s.abandoned])
  return counted
}

function snakeCase (name: string): string {
  return name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)
}

/**
 * Loads prom-client, the optional peer dependency, only when metrics are
 * asked for.
 */
export async function loadPromClient (specifier = 'prom-client'): Promise<Client> {
  let client: Client & { default?: Client }
  try {
    client = await import(specifier) as Client & { default?: Client }
  } catch (err) {
    // prom-client itself missing, not something it imports.
    const message = (err as { message?: unknown }).message
    if (!(typeof message === 'string' && message.startsWith(`Cannot find package '${specifier}'`))) throw err
    throw new InvalidOptionError('metrics needs prom-client >= 15, which is not installed: npm install prom-client')
  }
  const loaded = client.default ?? client
  if (typeof loaded.Histogram !== 'function' || typeof loaded.Counter?.prototype.reset !== 'function') {
    throw new InvalidOptionError(`metrics needs prom-client >= 15: ${specifier} does not export its Gauge, Counter and Histogram`)
  }
  return loaded
}

/**
 * Registers the plugin's metrics on the user's registry. Gauges and
 * counters are read from the pools' stats when the registry is scraped; the
 * request path pays one histogram observation per request admitted from a
 * queue, and nothing else.
 */
export async function registerMetrics (
  fastify: FastifyInstance,
  options: { registry: MetricsRegistry, prefix: string },
  pools: Pools,
  guard: ConnectionGuard | null,
  load: () => Promise<Client> = loadPromClient
): Promise<void> {
  const { registry, prefix } = options
  const names = (Object.keys(METRICS) as MetricName[])
    .filter((name) => guard !== null || !CONNECTION_METRICS.includes(name))
  const full = (name: MetricName): string => prefix + name
  let mine = taken.get(registry)
  if (mine === undefined) taken.set(registry, mine = new Set())
  for (const name of names) {
    if (mine.has(full(name)) || registry.getSingleMetric(full(name)) !== undefined) {
      throw new InvalidOptionError(`metrics: the registry already has a metric named ${full(name)} ` +
        '(another registration of this plugin on the same registry?): give each registration its own metrics.prefix')
    }
  }
  const client = await load()
  for (const name of names) mine.add(full(name))
  const registers = [registry as unknown as PromClient.Registry]
  const help = (name: MetricName): string => METRICS[name]

  const gauge = (name: MetricName, value: (s: LimiterStats) => number): void => {
    // eslint-disable-next-line no-new
    new client.Gauge({
      name: full(name),
      help: help(name),
      labelNames: ['pool'],
      registers,
      collect () {
        for (const s of pools.all()) this.set({ pool: s.name }, value(s))
      }
    })
  }
  gauge('in_flight', (s) => s.inFlight)
  gauge('queued', (s) => s.queued)
  gauge('limit', (s) => s.limit)
  gauge('max_queue', (s) => s.maxQueue)
  // eslint-disable-next-line no-new
  new client.Counter({
    name: full('requests_total'),
    help: help('requests_total'),
    labelNames: ['pool', 'result'],
    registers,
    collect () {
      // The pools keep the counts: the counter shows them as they are now.
      this.reset()
      for (const s of pools.all()) {
        for (const [result, n] of results(s)) this.inc({ pool: s.name, result }, n)
      }
    }
  })
  // eslint-disable-next-line no-new
  new client.Counter({
    name: full('priority_requests_total'),
    help: help('priority_requests_total'),
    labelNames: ['pool', 'priority', 'result'],
    registers,
    collect () {
      this.reset()
      for (const s of pools.all()) {
        for (const [priority, counts] of Object.entries(s.priority)) {
          this.inc({ pool: s.name, priority, result: 'admitted' }, counts.admitted)
          this.inc({ pool: s.name, priority, result: 'rejected' }, counts.rejected)
        }
      }
    }
  })
  if (guard !== null) {
    // eslint-disable-next-line no-new
    new client.Gauge({
      name: full('connections_open'),
      help: help('connections_open'),
      registers,
      collect () { this.set(guard.open) }
    })
    // eslint-disable-next-line no-new
    new client.Counter({
      name: full('connections_refused_total'),
      help: help('connections_refused_total'),
      registers,
      collect () {
        this.reset()
        this.inc(guard.refused)
      }
    })
  }

  // Every route's pool exists once the app is ready: their queue timeouts
  // become buckets.
  fastify.addHook('onReady', (done) => {
    const limiters = [...pools.limiters()]
    const timeouts = limiters.map((limiter) => limiter.queueTimeout / 1000).filter((s) => s > 0)
    const buckets = [...new Set([...WAIT_BUCKETS, ...timeouts])].sort((a, b) => a - b)
    const histogram = new client.Histogram({
      name: full('queue_wait_seconds'),
      help: help('queue_wait_seconds'),
      labelNames: ['pool'],
      buckets,
      registers
    })
    for (const limiter of limiters) {
      // Every pool's series, at zero until its first wait.
      histogram.zero({ pool: limiter.name })
      const child = histogram.labels({ pool: limiter.name })
      limiter.onWait = (ms) => { child.observe(ms / 1000) }
    }
    done()
  })

  fastify.addHook('onClose', (_instance, done) => {
    for (const name of names) {
      registry.removeSingleMetric(full(name))
      mine.delete(full(name))
    }
    done()
  })
}
