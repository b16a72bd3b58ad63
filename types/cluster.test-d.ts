import Fastify from 'fastify'
import { expectAssignable, expectError, expectType } from 'tsd'
import {
  runCluster,
  type Cluster,
  type ClusterOptions,
  type ClusterStats,
  type RecycleEvent,
  type RecycleReason,
  type WorkerStats
} from 'fastify-concurrency-limit/cluster'

const factory = async () => Fastify()
const cluster = await runCluster({
  workers: 2,
  maxRequests: 10_000,
  maxRequestsJitter: 2000,
  maxRssMb: 512,
  statsInterval: 1000,
  drainTimeout: 30_000,
  listen: { port: 3000, host: '0.0.0.0' },
  logger: false
}, factory)
expectType<Cluster | null>(cluster)
await runCluster({}, () => Fastify())
await runCluster({}, async () => Fastify({ https: { key: '', cert: '' } }))
await runCluster({}, async () => Fastify().withTypeProvider<{ schema: unknown, validator: unknown, serializer: unknown }>())
expectAssignable<ClusterOptions>({ logger: { info: (_: string) => {}, warn: (_: string) => {}, error: (_: string) => {} } })
expectError(runCluster({ workers: '2' }, factory))
expectError(runCluster({ listen: 3000 }, factory))
expectError(runCluster({}, () => 'not an app'))
expectError(runCluster({ maxRss: 512 }, factory))

if (cluster !== null) {
  expectType<number | null>(cluster.port)
  expectType<string | null>(cluster.address)
  const stats = cluster.stats()
  expectType<ClusterStats>(stats)
  expectType<WorkerStats[]>(stats.workers)
  expectType<number>(stats.recycles.memory)
  expectType<number>(stats.cut.inFlight)
  expectType<'starting' | 'serving' | 'draining'>(stats.workers[0].state)
  expectType<number>(stats.workers[0].rssBytes)
  cluster.on('recycle', (event) => {
    expectType<RecycleEvent>(event)
    expectType<RecycleReason>(event.reason)
  })
  expectType<Promise<void>>(cluster.close())
}
