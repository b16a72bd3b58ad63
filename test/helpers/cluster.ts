// Runs test/fixtures/cluster-app.ts as a child process: a primary and its
// workers, killed with their whole process group when the test ends.
import type { Test } from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { Pool } from 'undici'
import type { ClusterStats } from '../../lib/cluster/index.js'

const fixture = fileURLToPath(new URL('../fixtures/cluster-app.ts', import.meta.url))

export interface ClusterEvent {
  event: 'ready' | 'recycle' | 'stats' | 'closed'
  port?: number
  reason?: string
  pid?: number
  stats: ClusterStats
}

export interface RunningCluster {
  child: ChildProcess
  events: ClusterEvent[]
  stderr: () => string
  /** Resolves with the first event (seen or to come) that matches. */
  waitFor: (match: (event: ClusterEvent) => boolean, what: string, timeoutMs?: number) => Promise<ClusterEvent>
  waitForLog: (pattern: RegExp, timeoutMs?: number) => Promise<void>
  stats: () => Promise<ClusterStats>
  send: (command: string) => void
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
}

export function startCluster (t: Test, options: object, app: object = {}): RunningCluster {
  const child = spawn(process.execPath, [...process.execArgv, fixture], {
    env: { ...process.env, FCL_CLUSTER_OPTIONS: JSON.stringify(options), FCL_CLUSTER_APP: JSON.stringify(app) },
    stdio: ['pipe', 'pipe', 'pipe'],
    // Its own process group: the teardown kills the workers with it.
    detached: true
  })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => { resolve({ code, signal }) })
  })
  let running = true
  exited.then(() => { running = false })
  t.teardown(async () => {
    // A drain first, so that every process writes its coverage; then the
    // whole group is killed, whatever is left of it.
    if (running) {
      process.kill(child.pid as number, 'SIGTERM')
      const timer = setTimeout(() => { try { process.kill(-(child.pid as number), 'SIGKILL') } catch {} }, 10_000)
      await exited
      clearTimeout(timer)
    }
    try { process.kill(-(child.pid as number), 'SIGKILL') } catch {}
  })
  const events: ClusterEvent[] = []
  let err = ''
  const listeners = new Set<() => void>()
  let out = ''
  child.stdout?.setEncoding('utf8').on('data', (chunk: string) => {
    out += chunk
    let newline
    while ((newline = out.indexOf('\n')) !== -1) {
      events.push(JSON.parse(out.slice(0, newline)) as ClusterEvent)
      out = out.slice(newline + 1)
    }
    for (const listener of listeners) listener()
  })
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
    err += chunk
    for (const listener of listeners) listener()
  })
  const until = <T>(check: () => T | undefined, what: string, timeoutMs: number): Promise<T> => new Promise((resolve, reject) => {
    const listener = (): void => {
      const found = check()
      if (found === undefined) return
      clear()
      resolve(found)
    }
    const timer = setTimeout(() => {
      clear()
      reject(new Error(`timed out waiting for ${what}; stderr:\n${err}`))
    }, timeoutMs)
    const clear = (): void => {
      clearTimeout(timer)
      listeners.delete(listener)
    }
    listeners.add(listener)
    listener()
  })
  let asked = 0
  return {
    child,
    events,
    exited,
    stderr: () => err,
    send: (command) => { child.stdin?.write(command + '\n') },
    waitFor: (match, what, timeoutMs = 60_000) => until(() => events.find(match), what, timeoutMs),
    waitForLog: async (pattern, timeoutMs = 60_000) => { await until(() => pattern.test(err) ? true : undefined, String(pattern), timeoutMs) },
    stats: async () => {
      const seen = asked++
      child.stdin?.write('stats\n')
      const stats = await until(() => events.filter((e) => e.event === 'stats')[seen], 'stats', 10_000)
      return stats.stats
    }
  }
}

export interface Load { stop: () => Promise<{ ok: number, failures: string[], pids: Set<number> }> }

// Keep-alive GET and POST, each connection sending its next request as soon
// as the last one is answered. Every failure is kept: socket errors, resets,
// non-2xx.
export function load (origin: string, connections: number): Load {
  const pool = new Pool(origin, { connections, pipelining: 1 })
  const state = { stopped: false }
  let ok = 0
  const failures: string[] = []
  const pids = new Set<number>()
  const loop = async (i: number): Promise<void> => {
    for (let n = 0; !state.stopped; n++) {
      const post = (i + n) % 2 === 1
      try {
        const response = await pool.request(post
          ? { method: 'POST', path: '/', body: JSON.stringify({ n }), headers: { 'content-type': 'application/json' } }
          : { method: 'GET', path: '/' })
        const body = await response.body.json() as { pid: number, body?: { n: number } }
        if (response.statusCode !== 200) failures.push(`${post ? 'POST' : 'GET'} ${response.statusCode}`)
        else if (post && body.body?.n !== n) failures.push('POST body not echoed')
        else ok++
        pids.add(body.pid)
      } catch (error) {
        failures.push(`${post ? 'POST' : 'GET'} ${(error as Error).message}`)
      }
    }
  }
  const loops = Array.from({ length: connections }, (_, i) => loop(i))
  return {
    stop: async () => {
      state.stopped = true
      await Promise.all(loops)
      await pool.close()
      return { ok, failures, pids }
    }
  }
}

export async function ready (cluster: RunningCluster): Promise<string> {
  const event = await cluster.waitFor((e) => e.event === 'ready', 'the cluster to listen')
  return `http://127.0.0.1:${event.port as number}`
}
