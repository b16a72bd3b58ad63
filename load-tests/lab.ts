// What every scenario shares: the command-line flags, the machine, progress
// output, saving results, and target servers in child processes.
import { execSync } from 'node:child_process'
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs'
import { availableParallelism } from 'node:os'
import { parseArgs } from 'node:util'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { present } from './present.js'
import { printTable, stepSummary, writeHtmlReport, type ScenarioResult } from './report.js'
import { Target } from './target.js'
import type { ServerSettings } from './server.js'

export const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    'service-time': { type: 'string', default: '20' },
    'memory-kib': { type: 'string', default: '64' },
    'max-concurrency': { type: 'string', default: '100' },
    'max-queue': { type: 'string', default: '100' },
    'queue-timeout': { type: 'string', default: '1000' },
    connections: { type: 'string', default: '10,100,1000,5000' },
    rates: { type: 'string', default: '0.5,1,2,5,10,25,50' },
    // Open loop: the generator needs about one core for 10k requests/s, so
    // 50x capacity must stay near that: 10 slots / 50 ms = 200/s by default.
    'goodput-max-concurrency': { type: 'string', default: '10' },
    'goodput-service-time': { type: 'string', default: '50' },
    'thread-connections': { type: 'string', default: '10,100,500' },
    'cpu-ms': { type: 'string', default: '5' },
    'storm-connections': { type: 'string', default: '1000,5000' },
    'memory-connections': { type: 'string', default: '1000,4000' },
    // Long enough for steady state: the first second of a storm is all refusals.
    'storm-duration': { type: 'string', default: '10' },
    // Worker recycling: seconds per variant, requests per second offered,
    // which variants, MB above the idle RSS for maxRssMb.
    'recycle-duration': { type: 'string', default: '60' },
    'recycle-rate': { type: 'string', default: '1000' },
    'recycle-variants': { type: 'string', default: 'none,memory,requests' },
    'recycle-rss-margin': { type: 'string', default: '40' },
    duration: { type: 'string', default: '5' },
    repeats: { type: 'string', default: '3' },
    'client-timeout': { type: 'string', default: '1000' },
    // The cpu scenario's open-loop generator: raw (node:net, lean) or undici.
    generator: { type: 'string', default: 'raw' },
    // Where a run writes: its own folder under results/runs/ (not tracked)
    // unless told; --update-committed writes the tracked load-tests/results/.
    results: { type: 'string' },
    'update-committed': { type: 'boolean', default: false }
  }
})

export function num (name: keyof typeof values): number {
  const value = Number(values[name])
  if (!Number.isFinite(value) || value < 0) throw new Error(`--${name} must be a number >= 0, got ${String(values[name])}`)
  return value
}
export const list = (name: 'connections' | 'rates' | 'thread-connections' | 'storm-connections' | 'memory-connections') => String(values[name]).split(',').map(Number)

export const settingsBase: ServerSettings = {
  variant: 'plugin',
  serviceTime: num('service-time'),
  memoryKiB: num('memory-kib'),
  maxConcurrency: num('max-concurrency'),
  maxQueue: num('max-queue'),
  queueTimeout: num('queue-timeout')
}
export const duration = num('duration')
export const machine = { cores: availableParallelism(), node: process.version, platform: process.platform, date: new Date().toISOString() }
/** The results README links to, tracked in git. */
export const committedDir = fileURLToPath(new URL('../results', import.meta.url))
/** One folder per run, git-ignored. */
export const runsDir = join(committedDir, 'runs')

/** The newest run folder, for `report` without a folder. */
function latestRun (): string | undefined {
  if (!existsSync(runsDir)) return undefined
  const runs = readdirSync(runsDir).sort()
  return runs.length === 0 ? undefined : join(runsDir, runs[runs.length - 1])
}

function chooseResultsDir (): string {
  if (values.results !== undefined) return values.results
  if (values['update-committed'] === true) return committedDir
  if (positionals[0] === 'report') return latestRun() ?? committedDir
  return join(runsDir, machine.date.replace(/[:.]/g, '-'))
}
export const resultsDir = chooseResultsDir()

// Each connection is a file descriptor in the generator and one in the
// server. Node cannot raise its own limit: the npm scripts try (ulimit -n).
export function checkFdLimit (connections: number): void {
  let limit = Infinity
  try {
    const out = execSync('ulimit -n', { shell: '/bin/sh', encoding: 'utf8' }).trim()
    if (out !== 'unlimited') limit = Number(out)
  } catch {}
  if (limit < connections + 512) {
    progress(`the open-file limit is ${limit}: runs above ${limit - 512} connections will see connection errors (raise it with ulimit -n, the OS refused more)`)
  }
}

export function progress (message: string): void {
  process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${message}\n`)
}

/**
 * Saves a scenario's JSON (stamped with this run), prints its tables, and
 * renders the folder's report again: sections from other runs in the same
 * folder show their date.
 */
export function save (result: ScenarioResult): void {
  mkdirSync(resultsDir, { recursive: true })
  const stamped = { ...result, run: machine.date }
  writeFileSync(join(resultsDir, `${result.scenario}.json`), JSON.stringify(stamped, null, 2) + '\n')
  const { tables } = present(stamped)
  for (const table of tables) printTable(table)
  stepSummary(tables)
  progress(`${result.scenario}: ${writeHtmlReport(resultsDir, machine.date)}`)
}

export async function withTarget<T> (settings: ServerSettings, fn: (target: Target) => Promise<T>, execArgv?: string[]): Promise<T> {
  const target = await Target.start(settings, execArgv)
  try {
    return await fn(target)
  } finally {
    await target.stop()
  }
}

export const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits
