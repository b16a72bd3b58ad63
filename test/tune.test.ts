// `tune` against real servers on loopback whose knee is known: a server that
// works on at most K requests at once, each for S ms, serves K / S per
// second; below K throughput grows with concurrency, above it only latency
// does. Assertions are on levels and ratios, never on absolute rates.
import t, { type Test } from 'tap'
import http from 'node:http'
import { spawn } from 'node:child_process'
import { EventEmitter, once } from 'node:events'
import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { Worker } from 'node:worker_threads'
import type { AddressInfo } from 'node:net'
import { sweep, levelsUpTo, type SweepOptions, type SweepResult } from '../lib/cli/sweep.js'
import { recommend, type Step } from '../lib/cli/knee.js'
import { main, run, EXIT, type Io } from '../lib/cli/main.js'
import type { TuneReport } from '../lib/cli/report.js'

// Each sweep runs for seconds by design: more than tap's 30 s per file, on a
// busy machine or a slower Node.
t.setTimeout(180_000)

const cert = fileURLToPath(new URL('fixtures/cert.pem', import.meta.url))
const key = fileURLToPath(new URL('fixtures/key.pem', import.meta.url))
const bin = fileURLToPath(new URL('../lib/cli/bin.ts', import.meta.url))

interface KneeServer {
  url: string
  /** Counters of the server so far. */
  stats: () => Promise<{ peak: number, received: number }>
}

interface KneeServerOptions {
  /** K: requests worked on at once. */
  slots: number
  /** S: milliseconds each takes. */
  serviceMs: number
  /** Requests waiting beyond which a request is answered 503 at once (like the plugin's queue). */
  maxWaiting?: number
  tls?: boolean
}

// The server with a known knee runs in a worker thread: its timers fire on
// time while the test's event loop is busy generating load.
const KNEE_SERVER = `
const http = require('node:http')
const https = require('node:https')
const { parentPort, workerData } = require('node:worker_threads')
const { slots, serviceMs, maxWaiting, tls } = workerData
let working = 0
let inFlight = 0
let peak = 0
let received = 0
const waiting = []
const work = (res) => {
  working++
  setTimeout(() => {
    res.end('ok')
    inFlight--
    working--
    const next = waiting.shift()
    if (next !== undefined) work(next)
  }, serviceMs)
}
const handler = (req, res) => {
  req.resume()
  received++
  if (working < slots || waiting.length < maxWaiting) {
    inFlight++
    peak = Math.max(peak, inFlight)
    if (working < slots) work(res)
    else waiting.push(res)
  } else {
    res.statusCode = 503
    res.end('busy')
  }
}
const server = tls ? https.createServer(tls, handler) : http.createServer(handler)
server.listen(0, '127.0.0.1', () => parentPort.postMessage({ port: server.address().port }))
parentPort.on('message', (message) => {
  if (message === 'stats') return parentPort.postMessage({ peak, received })
  server.closeAllConnections()
  server.close()
  parentPort.close()
})
`

/** A server with a known knee, closed when the test ends. */
async function kneeServer (t: Test, { slots, serviceMs, maxWaiting = Infinity, tls = false }: KneeServerOptions): Promise<KneeServer> {
  const worker = new Worker(KNEE_SERVER, {
    eval: true,
    workerData: { slots, serviceMs, maxWaiting, tls: tls && { cert: readFileSync(cert), key: readFileSync(key) } }
  })
  const [{ port }] = await once(worker, 'message') as [{ port: number }]
  t.teardown(async () => {
    worker.postMessage('close')
    await once(worker, 'exit')
  })
  return {
    url: `${tls ? 'https' : 'http'}://127.0.0.1:${port}/`,
    stats: async () => {
      worker.postMessage('stats')
      const [stats] = await once(worker, 'message') as [{ peak: number, received: number }]
      return stats
    }
  }
}

/** A server answering with `handler`, in this thread, closed when the test ends. */
async function plainServer (t: Test, handler: http.RequestListener): Promise<string> {
  const server = http.createServer(handler).listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => {
    server.closeAllConnections()
    server.close()
  })
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}/`
}

/** A URL where nothing listens. */
async function closedPort (): Promise<string> {
  const server = http.createServer().listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address() as AddressInfo
  server.close()
  await once(server, 'close')
  return `http://127.0.0.1:${port}/`
}

function capture (signal?: AbortSignal): { io: Io, out: { stdout: string, stderr: string } } {
  const out = { stdout: '', stderr: '' }
  return {
    out,
    io: { stdout: (text) => { out.stdout += text }, stderr: (text) => { out.stderr += text }, signal }
  }
}

function options (url: string, overrides: Partial<SweepOptions> = {}): SweepOptions {
  return {
    url: new URL(url),
    method: 'GET',
    headers: {},
    expectStatus: '2xx',
    levels: levelsUpTo(256),
    stepMs: 400,
    maxMs: 60_000,
    maxRequests: 1_000_000,
    timeoutMs: 10_000,
    ...overrides
  }
}

/**
 * S of the servers with a known knee: long beside the round trip and the
 * timers' jitter, which leave exactly K in flight a little short of the best
 * throughput (the server idles while each answer travels back and the next
 * request comes). K is a power of two, so every level above it is a whole
 * number of K-sized waves and short steps measure it without a partial one.
 */
const SERVICE_MS = 200

const at = (steps: Step[], concurrency: number): Step => steps.find((step) => step.concurrency === concurrency) as Step
const curve = (steps: Step[]): string => steps.map((s) => `${s.concurrency}: ${s.throughput.toFixed(2)}/s p50 ${s.latency?.p50.toFixed(0)} ms`).join(', ')

/**
 * Runs a timed measurement until `exact` holds, three times at most: on a
 * busy shared machine a level now and then reads a few percent low (a
 * neighbour's load test starves the timers). A systematic error fails every
 * attempt; each attempt's curve is in the test's comments.
 */
async function measure<R> (t: Test, run: () => Promise<R>, exact: (result: R) => boolean, describe: (result: R) => string): Promise<R[]> {
  const results: R[] = []
  for (let attempt = 1; attempt <= 3; attempt++) {
    const result = await run()
    results.push(result)
    t.comment(`attempt ${attempt}: ${describe(result)}`)
    if (exact(result)) break
  }
  return results
}

t.test('finds the knee of a server that works on K at once, and stops soon after it', async (t) => {
  const server = await kneeServer(t, { slots: 4, serviceMs: SERVICE_MS })
  const levels = (result: SweepResult, phase: Step['phase']): number[] => result.steps.filter((s) => s.phase === phase).map((s) => s.concurrency)
  let seen: number[] = []
  const results = await measure(t,
    async () => {
      seen = []
      return sweep(options(server.url, { onStep: (step) => seen.push(step.concurrency) }))
    },
    (result) => recommend(result.steps, result)?.maxConcurrency === 4 && levels(result, 'sweep').length === 5,
    (result) => curve(result.steps))
  const result = results[results.length - 1]
  const { steps } = result

  t.equal(result.stoppedBy, 'knee')
  t.same(levels(result, 'sweep'), [1, 2, 4, 8, 16], 'two flat levels past the knee, far below --max 256')
  t.same(levels(result, 'refine'), [3], 'then the level between the knee and the one below it')
  t.same(seen, steps.map((s) => s.concurrency), 'onStep sees every step in order')
  const { peak, received } = await server.stats()
  t.equal(peak, Math.max(...results.flatMap((r) => r.steps.map((s) => s.concurrency))), 'the closed loop keeps exactly N in flight, never more')
  t.equal(received, results.reduce((sum, r) => sum + r.requests, 0), 'every request counted, the first one included')
  t.equal(result.requests, steps.reduce((sum, s) => sum + s.sent, 1))
  for (const step of steps) {
    t.equal(step.errors + step.otherStatus, 0)
    t.equal(step.idleSlots, 0)
    t.equal(step.partial, false)
  }

  const rate = (n: number): number => at(steps, n).throughput
  const p50 = (n: number): number => at(steps, n).latency?.p50 as number
  t.ok(rate(2) / rate(1) > 1.8 && rate(2) / rate(1) < 2.2, `below the knee throughput grows with N: x${(rate(2) / rate(1)).toFixed(2)} from 1 to 2`)
  t.ok(rate(3) / rate(8) < 0.85, `3 stays under the knee: ${(rate(3) / rate(8) * 100).toFixed(0)}% of 8`)
  t.ok(rate(16) / rate(8) > 0.9 && rate(16) / rate(8) < 1.1, `past it, flat: x${(rate(16) / rate(8)).toFixed(2)} from 8 to 16`)
  t.ok(p50(16) / p50(4) > 3, `and latency climbs: p50 x${(p50(16) / p50(4)).toFixed(1)} from 4 to 16`)

  const r = recommend(steps, { growing: result.growing })
  t.equal(r?.maxConcurrency, 4)
  t.equal(r?.maxQueue, 4)
  t.equal(r?.atLeast, false)
  const serviceRatio = (r?.serviceTimeMs as number) / SERVICE_MS
  t.ok(serviceRatio > 0.98 && serviceRatio < 1.15, `service time by Little's law near S: x${serviceRatio.toFixed(3)}`)
  t.ok((r?.queueTimeout as number) >= (r?.queueTimeoutExactMs as number), 'queueTimeout rounded up from p99 + a full queue\'s wait')
})

t.test('the text report: curve, chart, knee, Little\'s law and the snippet', async (t) => {
  const server = await kneeServer(t, { slots: 2, serviceMs: SERVICE_MS })
  const [{ code, out }] = (await measure(t,
    async () => {
      const { io, out } = capture()
      return { code: await main(['tune', server.url, '--step-seconds', '0.4', '--max-wait', '500'], io), out }
    },
    ({ out }) => out.stdout.includes('maxConcurrency: 2,'),
    ({ out }) => /Knee: .*/.exec(out.stdout)?.[0] ?? out.stdout)).slice(-1)
  t.equal(code, EXIT.ok)
  t.match(out.stdout, /stopped: throughput stopped growing and latency climbed/)
  t.match(out.stdout, /concurrency +2xx\/s +p50 ms +p99 ms +errors +non-2xx +tool cpu/)
  t.match(out.stdout, /\n +2 +[\d.]+ .* <- knee\n/)
  t.match(out.stdout, /\n +2 \| #+ +\| #+ +\| <- knee\n/)
  t.match(out.stdout, /Knee: 2 in flight reached/)
  t.match(out.stdout, /maxConcurrency 2: the knee\. Service time there S = 2 \/ [\d.]+\/s = [\d.]+ ms/)
  // --max-wait 500 ms at about 2 / 200 ms: a queue of about 5.
  const maxQueue = Number(/maxQueue: (\d+),/.exec(out.stdout)?.[1])
  t.ok(maxQueue >= 4 && maxQueue <= 5, `maxQueue from the --max-wait budget: ${maxQueue}`)
  t.match(out.stdout, /maxQueue \d+: the --max-wait budget of 500 ms x [\d.]+\/s, rounded down/)
  t.match(out.stdout, /await app\.register\(concurrencyLimit, \{\n {4}maxConcurrency: 2,\n {4}maxQueue: \d+,\n {4}queueTimeout: \d+\n {2}\}\)/)
})

t.test('refusals end the sweep; the knee comes from the clean levels', async (t) => {
  // 4 at work and 4 waiting, then 503 at once, as a server behind the plugin.
  const server = await kneeServer(t, { slots: 4, serviceMs: SERVICE_MS, maxWaiting: 4 })
  const [result] = (await measure(t,
    async () => sweep(options(server.url)),
    (result) => recommend(result.steps, result)?.maxConcurrency === 4,
    (result) => curve(result.steps))).slice(-1)
  t.equal(result.stoppedBy, 'errors')
  t.same(result.steps.filter((s) => s.phase === 'sweep').map((s) => s.concurrency).slice(-1), [16], 'the first level past 4 + 4')
  t.ok(at(result.steps, 16).otherStatus > 0)
  t.equal(at(result.steps, 8).otherStatus, 0, '8 fit: 4 at work, 4 waiting')
  t.equal(recommend(result.steps, { growing: result.growing })?.maxConcurrency, 4)
})

t.test('connection errors in a level: no clean level, no recommendation', async (t) => {
  let n = 0
  const url = await plainServer(t, (_req, res) => {
    if (n++ % 2 === 1) res.socket?.destroy()
    else res.end('ok')
  })
  const { io, out } = capture()
  t.equal(await main(['tune', url, '--step-seconds', '0.2'], io), EXIT.noRecommendation)
  t.match(out.stdout, /stopped: a level failed \(errors or unexpected statuses\)/)
  t.match(out.stdout, /\n +1 +[\d.]+ .* failed\n/)
  t.match(out.stdout, /No recommendation: no level was measured without failures\./)
  t.match(out.stdout, /Note: At concurrency 1, \d+ of \d+ requests failed \(ECONNRESET x\d+\)/)
})

t.test('a first request that fails ends it before any load', async (t) => {
  t.test('nothing listening', async (t) => {
    const { io, out } = capture()
    t.equal(await main(['tune', await closedPort()], io), EXIT.noRecommendation)
    t.match(out.stdout, /The first request to GET http:\/\/127\.0\.0\.1:\d+\/ failed: ECONNREFUSED\. Is the server running there\? Nothing was swept\./)
  })
  t.test('an unexpected status shows the start of the answer', async (t) => {
    const url = await plainServer(t, (req, res) => {
      res.statusCode = 415
      res.end(`{"message":"Unsupported Media Type: ${req.headers['content-type']}"}` + 'x'.repeat(1000))
    })
    const { io, out } = capture()
    t.equal(await main(['tune', url, '--method', 'post', '--body', '{}', '--header', 'content-type: text/plain'], io), EXIT.noRecommendation)
    t.match(out.stdout, /was answered 415, not 2xx\. Nothing was swept\./)
    t.match(out.stdout, /The answer began: \{"message":"Unsupported Media Type: text\/plain"\}x+\n/)
    t.ok(out.stdout.length < 1000, 'only the start of the body')
  })
  t.test('a connection closed mid-answer, and a timeout', async (t) => {
    const url = await plainServer(t, (req, res) => {
      if (req.url === '/slow') return
      res.writeHead(200, { 'content-length': 100 })
      res.write('abc')
      setTimeout(() => res.socket?.destroy(), 10)
    })
    const { io, out } = capture()
    t.equal(await main(['tune', url], io), EXIT.noRecommendation)
    t.match(out.stdout, /failed: ECONNRESET/)
    const slow = capture()
    t.equal(await main(['tune', url + 'slow', '--timeout', '50'], slow.io), EXIT.noRecommendation)
    t.match(slow.out.stdout, /failed: timeout/)
  })
  t.test('no answer before --max-seconds', async (t) => {
    const url = await plainServer(t, () => { /* never answers */ })
    const { io, out } = capture()
    const started = performance.now()
    t.equal(await main(['tune', url, '--step-seconds', '0.2', '--max-seconds', '0.4'], io), EXIT.noRecommendation)
    t.ok(performance.now() - started < 2000, 'it stops on time')
    t.equal(out.stdout, `\nThe first request to GET ${url} got no answer within --max-seconds (0.4 s). Is the server answering? Nothing was swept.\n`)
  })
})

t.test('bounds that leave no level after the first request say so', async (t) => {
  const url = await plainServer(t, (_req, res) => { res.end('ok') })
  const requests = capture()
  t.equal(await main(['tune', url, '--max-requests', '1'], requests.io), EXIT.noRecommendation)
  t.equal(requests.out.stdout, '\n--max-requests (1) left no request for a level after the first. Nothing was swept.\n')
  const time = capture()
  t.equal(await main(['tune', url, '--step-seconds', '0.5', '--max-seconds', '0.5'], time.io), EXIT.noRecommendation)
  t.equal(time.out.stdout, '\n--max-seconds (0.5 s) left no time for a level of --step-seconds (0.5 s) after the first request. Nothing was swept.\n')
})

t.test('request flags reach the server: method, headers, body, https with --ca', async (t) => {
  let seen = { method: '', headers: {} as http.IncomingHttpHeaders, body: '' }
  const url = await plainServer(t, (req, res) => {
    let body = ''
    req.on('data', (chunk: Buffer) => { body += chunk.toString() })
    req.on('end', () => {
      seen = { method: req.method as string, headers: req.headers, body }
      res.statusCode = 201
      res.end()
    })
  })
  const { io, out } = capture()
  const code = await main(['tune', url, '--method', 'put', '--header', 'x-a: 1', '--header', 'x-a:2', '--header', 'x-b: three',
    '--body', '{"n":1}', '--expect-status', '201', '--max', '2', '--step-seconds', '0.1'], io)
  t.equal(code, EXIT.ok)
  t.equal(seen.method, 'PUT')
  t.equal(seen.headers['x-a'], '1, 2')
  t.equal(seen.headers['x-b'], 'three')
  t.equal(seen.body, '{"n":1}')
  t.match(out.stdout, /concurrency +ok\/s .* other/, 'a custom --expect-status is "ok", not "2xx"')

  const secure = await kneeServer(t, { slots: 10, serviceMs: 5, tls: true })
  const tls = capture()
  t.equal(await main(['tune', secure.url, '--ca', cert, '--max', '2', '--step-seconds', '0.1', '--json'], tls.io), EXIT.ok)
  t.ok((await secure.stats()).received > 2)
  const untrusted = capture()
  t.equal(await main(['tune', secure.url, '--max', '2', '--step-seconds', '0.1'], untrusted.io), EXIT.noRecommendation)
  t.match(untrusted.out.stdout, /failed: (DEPTH_ZERO_SELF_SIGNED_CERT|SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE)/)
})

t.test('bounds: time, requests, and a level that never answers', async (t) => {
  t.test('--max-seconds while throughput still grows', async (t) => {
    // No limit at all: throughput doubles with every level.
    const server = await kneeServer(t, { slots: 10_000, serviceMs: 20 })
    const { io, out } = capture()
    const started = Date.now()
    t.equal(await main(['tune', server.url, '--step-seconds', '0.2', '--max-seconds', '0.7', '--json'], io), EXIT.ok)
    t.ok(Date.now() - started < 1500, 'bounded in time')
    const report = JSON.parse(out.stdout) as TuneReport
    t.equal(report.stoppedBy, 'time')
    t.equal(report.recommendation?.atLeast, true)
    t.match(report.warnings.join('\n'), /still grew at concurrency \d+, the largest level measured: the knee is there or higher \(rerun with more --max-seconds or --max-requests\)/)
    t.match(report.warnings.join('\n'), /cut short \(--max-seconds reached\)/)
  })
  t.test('--max-requests', async (t) => {
    const server = await kneeServer(t, { slots: 10_000, serviceMs: 5 })
    const { io, out } = capture()
    t.equal(await main(['tune', server.url, '--step-seconds', '0.5', '--max-requests', '150', '--json'], io), EXIT.ok)
    const report = JSON.parse(out.stdout) as TuneReport
    t.equal(report.stoppedBy, 'requests')
    t.equal(report.requests, 150)
    t.equal((await server.stats()).received, 150, 'not one request more')
    t.equal(report.steps.at(-1)?.partial, true)
  })
  t.test('a level shorter than one request: one answer per slot', async (t) => {
    const server = await kneeServer(t, { slots: 100, serviceMs: 300 })
    const result = await sweep(options(server.url, { levels: [1, 4], stepMs: 100 }))
    t.same(result.steps.map((s) => s.ok), [1, 4])
    const [one, four] = result.steps
    t.ok(four.throughput / one.throughput > 3.5 && four.throughput / one.throughput < 4.5, `x${(four.throughput / one.throughput).toFixed(2)}`)
    t.ok((four.latency?.p50 as number) >= 300, 'the latency of the only answers there are')
  })
  t.test('a level is not started when it cannot finish before the deadline', async (t) => {
    // Steps of 2 s against 1 s in all: the preflight runs, no level does.
    const server = await kneeServer(t, { slots: 10, serviceMs: 5 })
    const result = await sweep(options(server.url, { stepMs: 2000, maxMs: 1000 }))
    t.equal(result.stoppedBy, 'time')
    t.equal(result.steps.length, 0)
    t.equal((await server.stats()).received, 1, 'the preflight request alone')
  })
  t.test('the deadline cancels a level whose answers never come', async (t) => {
    // Answers 30 requests, then none: the first level's last request hangs
    // until --max-seconds.
    let answered = 0
    const url = await plainServer(t, (_req, res) => {
      if (answered++ < 30) res.end('ok')
    })
    const result = await sweep(options(url, { stepMs: 200, maxMs: 600 }))
    t.equal(result.stoppedBy, 'time')
    t.ok(result.elapsedMs < 1000)
    t.equal(result.steps.length, 1)
    t.equal(result.steps[0].partial, true)
  })
})

t.test('Ctrl-C prints what was measured', async (t) => {
  t.test('during a level with no answer yet', async (t) => {
    const server = await kneeServer(t, { slots: 100, serviceMs: 150 })
    const interrupt = new AbortController()
    const { io, out } = capture(interrupt.signal)
    // Stop 50 ms into the second level: its requests are all in flight.
    const stderr = io.stderr
    io.stderr = (text) => {
      stderr(text)
      if (text.includes(' 1 in flight')) setTimeout(() => interrupt.abort(), 50)
    }
    t.equal(await main(['tune', server.url, '--step-seconds', '0.3'], io), EXIT.interrupted)
    t.match(out.stdout, /stopped: interrupted/)
    t.match(out.stdout, /\n +2 +0\.0 +- +- +0 +0 .*partial\n/)
    t.match(out.stdout, /Note: At concurrency 2, 2 of 2 request slots got no answer/)
    t.match(out.stdout, /Note: The sweep was cut short \(interrupted\)/)
    t.match(out.stdout, /maxConcurrency: 1,/, 'a recommendation from the one level measured')
  })
  t.test('before the first answer', async (t) => {
    const server = await kneeServer(t, { slots: 1, serviceMs: 200 })
    const { io, out } = capture(AbortSignal.timeout(50))
    t.equal(await main(['tune', server.url], io), EXIT.interrupted)
    t.equal(out.stdout, '\nInterrupted before any level was measured.\n')
  })
  t.test('after the first answer, before a level', async (t) => {
    const server = await kneeServer(t, { slots: 1, serviceMs: 1 })
    const interrupt = new AbortController()
    const result = await sweep(options(server.url, {
      signal: interrupt.signal,
      levels: [1],
      onStep: () => interrupt.abort()
    }))
    t.equal(result.stoppedBy, 'interrupted')
    const again = await sweep(options(server.url, { signal: interrupt.signal }))
    t.equal(again.stoppedBy, 'interrupted', 'an aborted signal stops it at once')
    t.same(again.steps, [])
  })
  t.test('during the refinement', async (t) => {
    // The first level refined is interrupted; the next one is not measured.
    const server = await kneeServer(t, { slots: 8, serviceMs: 100 })
    const interrupt = new AbortController()
    const result = await sweep(options(server.url, {
      stepMs: 200,
      signal: interrupt.signal,
      onStep: (step) => { if (step.phase === 'refine') interrupt.abort() }
    }))
    t.equal(result.stoppedBy, 'interrupted')
    t.equal(result.steps.filter((s) => s.phase === 'refine').length, 1)
  })
})

t.test('run(): the process, its argv, exit code and Ctrl-C', async (t) => {
  class FakeProcess extends EventEmitter {
    argv: string[]
    exitCode?: number | string | null
    stdout = { text: '', write (s: string) { this.text += s } }
    stderr = { text: '', write (s: string) { this.text += s } }
    exits: number[] = []
    constructor (...args: string[]) {
      super()
      this.argv = ['node', 'fastify-concurrency-limit', ...args]
    }

    exit (code: number): void { this.exits.push(code) }
  }
  const help = new FakeProcess('--help')
  await run(help)
  t.equal(help.exitCode, 0)
  t.match(help.stdout.text, /^Usage: fastify-concurrency-limit <command>/)
  t.equal(help.listenerCount('SIGINT'), 0, 'the SIGINT listener is removed')

  const bad = new FakeProcess('tune', 'http://127.0.0.1:1/', '--max', '0')
  await run(bad)
  t.equal(bad.exitCode, EXIT.usage)
  t.equal(bad.stdout.text, '')
  t.match(bad.stderr.text, /^tune: --max must be an integer from 1 to 10000, received "0"\n/)

  const server = await kneeServer(t, { slots: 100, serviceMs: 20 })
  const proc = new FakeProcess('tune', server.url, '--step-seconds', '0.2')
  const running = run(proc)
  while (!proc.stderr.text.includes(' 1 in flight')) await new Promise((resolve) => setTimeout(resolve, 10))
  proc.emit('SIGINT')
  t.match(proc.stderr.text, /Stopping; Ctrl-C again quits at once\./)
  proc.emit('SIGINT')
  t.same(proc.exits, [EXIT.interrupted], 'twice: exit at once')
  await running
  t.equal(proc.exitCode, EXIT.interrupted)
  t.match(proc.stdout.text, /stopped: interrupted/)
})

t.test('the command line, in a child process', async (t) => {
  const server = await kneeServer(t, { slots: 2, serviceMs: SERVICE_MS })
  const cli = async (args: string[], onStderr?: (text: string, child: ReturnType<typeof spawn>) => void): Promise<{ code: number | null, stdout: string, stderr: string }> => {
    const child = spawn(process.execPath, [...process.execArgv, bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (chunk: Buffer) => { stdout += chunk.toString() })
    child.stderr.on('data', (chunk: Buffer) => {
      stderr += chunk.toString()
      onStderr?.(stderr, child)
    })
    const [code] = await once(child, 'close') as [number | null]
    return { code, stdout, stderr }
  }
  const done = await cli(['tune', server.url, '--json', '--step-seconds', '0.3', '--max', '64'])
  t.equal(done.code, 0, 'exits 0')
  const report = JSON.parse(done.stdout) as TuneReport
  // One attempt only: within [K, 2K], as the doubling levels alone would give.
  t.ok(report.config !== undefined && report.config.maxConcurrency >= 2 && report.config.maxConcurrency <= 4, `maxConcurrency ${report.config?.maxConcurrency} for K = 2`)
  t.equal(report.stoppedBy, 'knee')
  t.match(done.stderr, /^tune: GET http:\/\/127\.0\.0\.1:\d+\/ \(success: 2xx\)/)
  t.match(done.stderr, /concurrency 1, 2, 4, 8, \.\.\. 64, 0\.3 s each/)
  t.match(done.stderr, /\n +2 in flight: [\d.,]+\/s, p50 [\d.]+ ms, p99 [\d.]+ ms\n/)

  let signalled = false
  const interrupted = await cli(['tune', server.url, '--step-seconds', '0.3'], (stderr, child) => {
    if (!signalled && stderr.includes(' 2 in flight')) {
      signalled = true
      child.kill('SIGINT')
    }
  })
  t.equal(interrupted.code, 130)
  t.match(interrupted.stdout, /stopped: interrupted/)
  t.match(interrupted.stdout, /\n +2 +[\d.]+ /, 'the levels measured are printed')
})
