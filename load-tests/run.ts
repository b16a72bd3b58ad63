// The load-test lab. Usage: node load-tests/.out/run.js <scenario> [--flags]
//   bench       overhead of the plugin on hello-world (req/s, server CPU per request)
//   instructions the same as instructions per request, counted under valgrind (needs valgrind)
//   explosion   closed-loop connection sweep, bare vs plugin
//   goodput     open-loop goodput at multiples of capacity, and a step profile
//   threads     a new worker thread per request vs a bounded pool behind the plugin
//   deadlock    a route calling its own server: shared pool vs queue timeout vs separate pools
//   reject-cost server CPU of a refusal against the floor (node:http) and a Fastify 200
//   retry-storm closed loop that retries every refusal at once: bare vs the plugin's mechanisms
//   backlog     5,000 new connections against listen backlogs of 511 and 4096 (nstat counters)
//   memory      live memory per connection: idle, queued, refusal held back
//   pooled-client open loop over a pool of keep-alive connections: 503s or client timeouts
//   cpu         a CPU-bound route: maxEventLoopDelay against bare Fastify and under-pressure
//   priority    priority classes at 10x overload, with and without them
//   adaptive    an adaptive limit against a downstream whose capacity changes
//   fleet       three instances sharing a group through Redis (needs redis-server): kill -9, Redis restart
//   recycle     runCluster under keep-alive load with a leaking route: no recycling, maxRssMb, maxRequests
//   all         every scenario above but bench and instructions (fleet only if redis-server is on PATH), then the HTML report
//   ci          short profile that fails when an invariant breaks
import { checkFdLimit, list, positionals, progress, resultsDir, save } from './lab.js'
import { writeHtmlReport } from './report.js'
import { adaptive } from './scenarios/adaptive.js'
import { backlog } from './scenarios/backlog.js'
import { bench } from './scenarios/bench.js'
import { ci } from './scenarios/ci.js'
import { cpu } from './scenarios/cpu.js'
import { deadlock } from './scenarios/deadlock.js'
import { explosion } from './scenarios/explosion.js'
import { fleet, redisServerAvailable } from './scenarios/fleet.js'
import { goodput } from './scenarios/goodput.js'
import { instructions } from './scenarios/instructions.js'
import { memory } from './scenarios/memory.js'
import { pooledClient } from './scenarios/pooled-client.js'
import { priority } from './scenarios/priority.js'
import { recycle } from './scenarios/recycle.js'
import { rejectCost } from './scenarios/reject-cost.js'
import { storm } from './scenarios/retry-storm.js'
import { threads } from './scenarios/threads.js'

const scenario = positionals[0] ?? 'all'
checkFdLimit(Math.max(...list('connections'), ...list('storm-connections'), ...list('memory-connections'), 2048))
switch (scenario) {
  case 'bench':
    save(await bench())
    break
  case 'instructions': {
    const result = await instructions()
    if (result !== null) save(result)
    break
  }
  case 'explosion':
    save(await explosion())
    break
  case 'goodput':
    save(await goodput())
    break
  case 'reject-cost':
    save(await rejectCost())
    break
  case 'retry-storm':
    save(await storm())
    break
  case 'threads':
    save(await threads())
    break
  case 'backlog':
    save(await backlog())
    break
  case 'deadlock':
    save(await deadlock())
    break
  case 'memory':
    save(await memory())
    break
  case 'pooled-client':
    save(await pooledClient())
    break
  case 'cpu':
    save(await cpu())
    break
  case 'priority':
    save(await priority())
    break
  case 'adaptive':
    save(await adaptive())
    break
  case 'fleet':
    save(await fleet())
    break
  case 'recycle':
    save(await recycle())
    break
  case 'all':
    save(await explosion())
    save(await goodput())
    save(await threads())
    save(await deadlock())
    save(await rejectCost())
    save(await storm())
    save(await backlog())
    save(await memory())
    save(await pooledClient())
    save(await cpu())
    save(await priority())
    save(await adaptive())
    if (redisServerAvailable()) save(await fleet())
    else progress('fleet: skipped, redis-server is not on PATH (install Redis to run the fleet scenario)')
    progress(`report: ${writeHtmlReport(resultsDir)}`)
    break
  case 'report':
    progress(`report: ${writeHtmlReport(resultsDir)}`)
    break
  case 'ci':
    if (!await ci()) process.exitCode = 1
    break
  default:
    console.error(`unknown scenario "${scenario}": use bench, instructions, explosion, goodput, threads, deadlock, reject-cost, retry-storm, backlog, memory, pooled-client, cpu, priority, adaptive, fleet, recycle, all, report or ci`)
    process.exitCode = 2
}
