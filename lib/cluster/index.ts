import cluster from 'node:cluster'
import { resolveClusterOptions, type AppFactory, type ClusterOptions } from './options.js'
import { Supervisor, type Cluster } from './primary.js'
import { runWorker } from './worker.js'

export { InvalidOptionError } from '../errors.js'
export type { Cut } from './drain.js'
export type { RecycleReason } from './messages.js'
export type { AppFactory, ClusterLogger, ClusterOptions } from './options.js'
export type { Cluster, ClusterStats, RecycleEvent, WorkerState, WorkerStats } from './primary.js'

/**
 * Serves the app from `workers` processes that share one port, and replaces
 * each one, without failing a request, after `maxRequests` (plus jitter)
 * requests, once its RSS passes `maxRssMb`, or when it crashes.
 *
 * Call it from the entry script: the primary runs it to fork the workers,
 * each worker runs the same script again, reaches the same call and runs the
 * factory there. In the primary it resolves to the cluster's handle once
 * every worker listens; in a worker, to null once that worker listens.
 */
export async function runCluster (options: ClusterOptions, factory: AppFactory): Promise<Cluster | null> {
  const resolved = resolveClusterOptions(options, factory)
  if (!cluster.isPrimary) {
    await runWorker(resolved, factory)
    return null
  }
  const supervisor = new Supervisor(resolved)
  await supervisor.start()
  return supervisor
}
