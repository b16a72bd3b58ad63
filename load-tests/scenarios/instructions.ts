import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import autocannon from 'autocannon'
import type { HelloVariant } from '../hello-server.js'
import { machine, num, progress } from '../lab.js'
import type { ScenarioResult, Table } from '../report.js'
import { median } from '../stats.js'

const serverPath = fileURLToPath(new URL('../hello-server.js', import.meta.url))
const WARM_UP = 15_000
const MEASURED = 10_000

/** True if valgrind's callgrind and its control script are on PATH. */
export function valgrindAvailable (): boolean {
  return spawnSync('valgrind', ['--version']).status === 0 && spawnSync('callgrind_control', ['-h']).status === 0
}

/**
 * Instructions the server runs per request of one variant: the server runs
 * under callgrind (which counts every instruction of every thread), one
 * connection sends `WARM_UP` requests for the JIT to settle, the counters
 * are zeroed, and `MEASURED` more requests are counted. One connection, so
 * that every request is one turn of the loop: with many, how many requests
 * one read brings depends on timing, and so does the count. V8 runs with
 * --single-threaded, its compilers and collector on the main thread, so
 * that their work does not race the counting.
 */
async function count (variant: HelloVariant): Promise<number> {
  const dir = mkdtempSync(join(tmpdir(), 'fcl-callgrind-'))
  const child = spawn('valgrind', ['--tool=callgrind', `--callgrind-out-file=${join(dir, 'out')}`, process.execPath, '--single-threaded', serverPath, variant],
    { stdio: ['ignore', 'pipe', 'ignore'] })
  try {
    let output = ''
    child.stdout.setEncoding('utf8')
    const port = await new Promise<number>((resolve, reject) => {
      child.stdout.on('data', (chunk: string) => {
        output += chunk
        const match = /listening (\d+)/.exec(output)
        if (match !== null) resolve(Number(match[1]))
      })
      child.once('exit', (code) => { reject(new Error(`the server under valgrind exited (${String(code)}) before listening`)) })
    })
    const url = `http://127.0.0.1:${port}/hello`
    const load = async (amount: number): Promise<void> => {
      const result = await autocannon({ url, connections: 1, amount, timeout: 30 })
      if (result['2xx'] !== amount) throw new Error(`${variant}: ${result['2xx']} of ${amount} requests answered 2xx`)
    }
    await load(WARM_UP)
    control(['-z', String(child.pid)])
    await load(MEASURED)
    control(['-d', String(child.pid)])
    const dump = readdirSync(dir).find((name) => name.startsWith('out.'))
    if (dump === undefined) throw new Error('callgrind wrote no dump')
    const summary = /^summary: (\d+)$/m.exec(readFileSync(join(dir, dump), 'utf8'))
    if (summary === null) throw new Error(`no summary line in ${dump}`)
    return Number(summary[1]) / MEASURED
  } finally {
    if (child.exitCode === null) {
      const exited = once(child, 'exit')
      child.kill('SIGKILL')
      await exited
    }
    rmSync(dir, { recursive: true, force: true })
  }
}

function control (args: string[]): void {
  const res = spawnSync('callgrind_control', args, { encoding: 'utf8' })
  if (res.status !== 0) throw new Error(`callgrind_control ${args.join(' ')}: ${res.stderr}`)
}

/**
 * CPU per request without the machine's noise: instructions counted under
 * valgrind, which no other process, frequency change or neighbour of the VM
 * alters. Instructions are not time (a cache miss costs more than an
 * addition), but for a cost of a few percent they place it where timing on
 * a shared machine cannot.
 */
export async function instructions (): Promise<ScenarioResult | null> {
  if (!valgrindAvailable()) {
    progress('instructions: skipped, valgrind is not on PATH (apt-get install valgrind)')
    return null
  }
  const repeats = num('repeats')
  const variants: Array<{ name: string, variant: HelloVariant }> = [
    { name: 'bare Fastify', variant: 'bare' },
    { name: 'one empty route-level onRequest hook, no plugin', variant: 'hook' },
    { name: 'with the plugin', variant: 'plugin' },
    { name: 'with the plugin, adaptive', variant: 'adaptive' },
    { name: 'with the plugin and metrics', variant: 'metrics' }
  ]
  const counts = new Map(variants.map((v) => [v.name, [] as number[]]))
  for (let r = 0; r < repeats; r++) {
    for (const v of r % 2 === 0 ? variants : [...variants].reverse()) {
      const perRequest = await count(v.variant)
      counts.get(v.name)?.push(perRequest)
      progress(`instructions ${v.name} ${r + 1}/${repeats}: ${perRequest.toFixed(0)} per request`)
    }
  }
  const bare = median(counts.get('bare Fastify') as number[])
  const table: Table = {
    title: `Instructions per hello-world request, server under valgrind (callgrind, every thread; node --single-threaded; 1 connection, ${WARM_UP.toLocaleString('en-US')} requests to warm up, ${MEASURED.toLocaleString('en-US')} counted; ${repeats} runs each, median and range)`,
    columns: ['variant', 'instructions/request', 'range', 'ratio to bare', 'more than bare'],
    rows: variants.map((v) => {
      const all = counts.get(v.name) as number[]
      const mid = median(all)
      return [v.name, Math.round(mid), `${Math.round(Math.min(...all))}-${Math.round(Math.max(...all))}`, (mid / bare).toFixed(4), Math.round(mid - bare)]
    })
  }
  return {
    scenario: 'instructions',
    title: 'Instructions per request',
    options: { repeats, warmUp: WARM_UP, measured: MEASURED, connections: 1 },
    machine,
    tables: [table],
    charts: [],
    data: Object.fromEntries(counts)
  }
}
