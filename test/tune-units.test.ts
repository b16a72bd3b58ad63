// `tune` without load: its decisions on simulated curves, its flags, the
// host check and the report. test/tune.test.ts drives real servers.
import t from 'tap'
import { mkdtemp, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { once } from 'node:events'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import {
  failed, findKnee, nextRefinement, recommend, roundUpMs, trend, usable, type Step
} from '../lib/cli/knee.js'
import { errorCode, levelsUpTo, percentile, statusMatcher, sweep, type SweepResult } from '../lib/cli/sweep.js'
import { DEFAULTS, parseTuneArgs, TUNE_HELP, type TuneFlags } from '../lib/cli/args.js'
import { isLoopbackAddress, notLoopback, resolveAll, type Resolve } from '../lib/cli/target.js'
import { banner, buildReport, ms, progressLine, rate, renderText } from '../lib/cli/report.js'
import { EXIT, HELP, main, type Io } from '../lib/cli/main.js'

function step (concurrency: number, throughput: number, p50: number, extra: Partial<Step> = {}): Step {
  return {
    concurrency,
    phase: 'sweep',
    durationMs: 1000,
    sent: 100,
    ok: 100,
    otherStatus: 0,
    errors: 0,
    statuses: { 200: 100 },
    errorCodes: {},
    throughput,
    latency: { p50, p99: p50 * 1.5, max: p50 * 2 },
    toolCpu: 0.1,
    idleSlots: 0,
    partial: false,
    ...extra
  }
}

/** A server that works on `slots` at once for `serviceMs` each, as a closed loop measures it. */
function semaphore (slots: number, serviceMs: number) {
  return (concurrency: number, phase: Step['phase'] = 'sweep'): Step => step(
    concurrency,
    (Math.min(concurrency, slots) / serviceMs) * 1000,
    serviceMs * Math.max(1, concurrency / slots),
    { phase }
  )
}

/** The sweep's decisions in virtual time: the doubling levels, then the refinement. */
function simulate (measure: (concurrency: number, phase: Step['phase']) => Step, max: number) {
  const steps: Step[] = []
  let stop: string | undefined
  let growing = false
  for (const level of levelsUpTo(max)) {
    steps.push(measure(level, 'sweep'))
    const reading = trend(steps)
    growing = reading.growing
    stop = reading.stop
    if (stop !== undefined) break
  }
  for (let level = nextRefinement(steps, growing); level !== undefined; level = nextRefinement(steps, growing)) {
    steps.push(measure(level, 'refine'))
  }
  return {
    stop: stop ?? 'max',
    sweep: steps.filter((s) => s.phase === 'sweep').map((s) => s.concurrency),
    refine: steps.filter((s) => s.phase === 'refine').map((s) => s.concurrency),
    recommendation: recommend(steps, { growing })
  }
}

t.test('the sweep on simulated servers', async (t) => {
  const six = simulate(semaphore(6, 100), 256)
  t.equal(six.stop, 'knee')
  t.same(six.sweep, [1, 2, 4, 8, 16, 32], 'stops two flat levels past the knee')
  t.same(six.refine, [6, 5], 'bisects between 4 and 8')
  t.equal(six.recommendation?.maxConcurrency, 6)
  t.equal(six.recommendation?.serviceTimeMs, 100)

  const eight = simulate(semaphore(8, 100), 256)
  t.same(eight.refine, [6, 7])
  t.equal(eight.recommendation?.maxConcurrency, 8)

  // A knee of 100: the bisection stops within an eighth of the level below.
  const hundred = simulate(semaphore(100, 100), 256)
  t.equal(hundred.stop, 'max', 'only one flat level fits under --max 256')
  t.same(hundred.refine, [96, 80, 88])
  t.equal(hundred.recommendation?.maxConcurrency, 96)

  const one = simulate(semaphore(1, 10), 256)
  t.same(one.sweep, [1, 2, 4])
  t.same(one.refine, [])
  t.equal(one.recommendation?.maxConcurrency, 1)

  // Never saturated: every level grows; the knee is at least the largest.
  const open = simulate(semaphore(10_000, 100), 64)
  t.equal(open.stop, 'max')
  t.same(open.refine, [], 'nothing to bisect while throughput grows')
  t.equal(open.recommendation?.maxConcurrency, 64)
  t.equal(open.recommendation?.atLeast, true)
})

t.test('trend', async (t) => {
  t.same(trend([]), { growing: false, reference: undefined })
  const flat = [step(1, 100, 10), step(2, 101, 20), step(4, 100, 40)]
  t.equal(trend(flat).stop, 'knee')
  t.equal(trend(flat).reference?.concurrency, 1)
  t.equal(trend(flat.slice(0, 2)).stop, undefined, 'one flat level is not enough')
  t.equal(trend(flat.slice(0, 2)).growing, false)
  t.equal(trend([step(1, 100, 10), step(2, 101, 11), step(4, 100, 12)]).stop, undefined, 'flat without a climb in latency: go on')
  t.equal(trend([step(1, 100, 10), step(2, 101, 11), step(4, 100, 12, { toolCpu: 0.95 })]).stop, 'knee', 'or the load generator is busy')
  t.same(trend([step(1, 100, 10), step(2, 190, 10)]).growing, true)
  t.equal(trend([step(1, 100, 10), step(2, 100, 10, { errors: 2 })]).stop, 'errors')
  const idle = step(2, 0, 10, { idleSlots: 2 })
  t.equal(trend([step(1, 100, 10), idle]).growing, true, 'a step with idle slots is skipped')
})

t.test('failed, usable', async (t) => {
  t.equal(failed(step(1, 100, 10, { ok: 99, otherStatus: 1 })), false, '1% is tolerated')
  t.equal(failed(step(1, 100, 10, { ok: 98, otherStatus: 1, errors: 1 })), true)
  t.equal(failed(step(1, 0, 10, { ok: 0 })), false, 'no answers is not a failure')
  t.equal(usable(step(1, 0, 10, { ok: 0, latency: null })), false)
  t.equal(usable(step(1, 100, 10, { idleSlots: 1 })), false)
  t.equal(usable(step(1, 100, 10)), true)
})

t.test('findKnee, nextRefinement', async (t) => {
  t.equal(findKnee([]), undefined)
  t.equal(findKnee([step(1, 0, 10, { errors: 100, ok: 0 })]), undefined)
  const found = findKnee([step(4, 390, 10), step(1, 100, 10), step(2, 200, 10), step(8, 400, 20)])
  t.equal(found?.knee.concurrency, 4, 'the fewest in flight reaching 95% of the best, in any order')
  t.equal(found?.best.concurrency, 8)
  t.equal(found?.below?.concurrency, 2)
  t.same(found?.above.map((s) => s.concurrency), [8])
  t.equal(findKnee([step(1, 100, 10)])?.below, undefined)

  t.equal(nextRefinement([step(1, 100, 10), step(2, 200, 10), step(4, 390, 10)], true), undefined, 'not while growing')
  t.equal(nextRefinement([step(2, 200, 10), step(4, 390, 10)], false), 3)
  t.equal(nextRefinement([step(2, 200, 10), step(3, 200, 10, { errors: 50 }), step(4, 390, 10)], false), undefined, 'a level measured already is not measured again')
})

t.test('recommend, roundUpMs', async (t) => {
  const steps = [step(4, 200, 18, { latency: { p50: 18, p99: 45, max: 60 } }), step(8, 205, 39)]
  const r = recommend(steps, { growing: false })
  t.same(r, {
    maxConcurrency: 4,
    maxQueue: 4,
    queueTimeout: 100,
    atLeast: false,
    capacity: 200,
    serviceTimeMs: 20,
    p50Ms: 18,
    p99Ms: 45,
    queueWaitMs: 20,
    queueTimeoutExactMs: 65
  })
  const budget = recommend(steps, { growing: false, maxWaitMs: 250 })
  t.equal(budget?.maxQueue, 50, '250 ms at 200/s')
  t.equal(budget?.queueWaitMs, 250)
  t.equal(budget?.queueTimeout, 300, '45 + 250, rounded up')
  t.equal(recommend(steps, { growing: false, maxWaitMs: 0 })?.maxQueue, 0)
  t.equal(recommend([], { growing: false }), undefined)
  t.equal(recommend(steps, { growing: true })?.atLeast, false, 'growing, but levels above the knee were measured')

  t.equal(roundUpMs(0), 100)
  t.equal(roundUpMs(99.9), 100)
  t.equal(roundUpMs(100), 100)
  t.equal(roundUpMs(101), 110)
  t.equal(roundUpMs(137), 140)
  t.equal(roundUpMs(140), 140)
  t.equal(roundUpMs(1234), 1300)
  t.equal(roundUpMs(2 ** 40), 2 ** 31 - 1, 'at most what a timer takes')
})

t.test('statusMatcher, percentile, levelsUpTo, errorCode', async (t) => {
  const twoxx = statusMatcher('2xx') as (status: number) => boolean
  t.same([200, 204, 299, 301, 503].map(twoxx), [true, true, true, false, false])
  const list = statusMatcher(' 2XX, 304 ') as (status: number) => boolean
  t.same([200, 304, 302].map(list), [true, true, false])
  for (const bad of ['', 'abc', '600', '6xx', '20', '2xx,', '200;204']) t.equal(statusMatcher(bad), undefined, bad)

  t.equal(percentile([1, 2, 3, 4], 0.5), 2)
  t.equal(percentile([1, 2, 3, 4], 0.99), 4)
  t.equal(percentile([7], 0), 7)
  t.same(levelsUpTo(1), [1])
  t.same(levelsUpTo(8), [1, 2, 4, 8])
  t.same(levelsUpTo(100), [1, 2, 4, 8, 16, 32, 64, 100])
  t.equal(errorCode(Object.assign(new Error('x'), { code: 'ECONNRESET' })), 'ECONNRESET')
  t.equal(errorCode(new Error('socket hang up')), 'socket hang up')

  await t.rejects(sweep({
    url: new URL('http://127.0.0.1:1/'),
    method: 'GET',
    headers: {},
    expectStatus: 'nope',
    levels: [1],
    stepMs: 100,
    maxMs: 1000,
    maxRequests: 10,
    timeoutMs: 100
  }), new TypeError('invalid expectStatus: nope'))
})

t.test('flags', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tune-'))
  const bodyFile = join(dir, 'body.json')
  await writeFile(bodyFile, '{"from":"file"}')

  const defaults = await parseTuneArgs(['http://127.0.0.1:3000/work']) as TuneFlags
  t.same({ ...defaults, url: defaults.url.href }, {
    url: 'http://127.0.0.1:3000/work',
    method: 'GET',
    headers: {},
    body: undefined,
    ca: undefined,
    expectStatus: '2xx',
    timeoutMs: 10_000,
    max: 256,
    levels: [1, 2, 4, 8, 16, 32, 64, 128, 256],
    stepSeconds: 3,
    maxSeconds: 60,
    maxRequests: 1_000_000,
    maxWaitMs: undefined,
    json: false,
    iOwnThisHost: false
  })
  t.equal(DEFAULTS.max, 256)

  const all = await parseTuneArgs([
    '--method', 'post', '--header', 'Content-Type: application/json', '--header=x-a:1', '--header', 'X-A: 2', '--header', 'x-a:3', '--header', 'x-empty:',
    '--body-file', bodyFile, '--expect-status', '200,204', '--timeout', '500', '--ca', bodyFile,
    '--max', '100', '--step-seconds', '0.5', '--max-seconds', '10', '--max-requests', '5000', '--max-wait', '250',
    '--json', '--i-own-this-host', 'https://example.com/x'
  ]) as TuneFlags
  t.equal(all.url.href, 'https://example.com/x')
  t.equal(all.method, 'POST')
  t.same(all.headers, { 'content-type': 'application/json', 'x-a': ['1', '2', '3'], 'x-empty': '' })
  t.equal(all.body?.toString(), '{"from":"file"}')
  t.equal(all.ca?.toString(), '{"from":"file"}')
  t.same(
    [all.expectStatus, all.timeoutMs, all.max, all.stepSeconds, all.maxSeconds, all.maxRequests, all.maxWaitMs, all.json, all.iOwnThisHost],
    ['200,204', 500, 100, 0.5, 10, 5000, 250, true, true])
  t.same(all.levels, [1, 2, 4, 8, 16, 32, 64, 100])
  t.equal((await parseTuneArgs(['--body', 'text', 'http://127.0.0.1/']))?.body?.toString(), 'text')
  t.equal(await parseTuneArgs(['--help']), undefined)
  t.equal(await parseTuneArgs(['-h', 'http://127.0.0.1/']), undefined)

  const bad: Array<[string[], RegExp]> = [
    [[], /the URL of the endpoint to tune is missing/],
    [['http://127.0.0.1/a', 'http://127.0.0.1/b'], /one URL is expected, received 2/],
    [['127.0.0.1:3000'], /the URL must start with http:\/\/ or https:\/\/, received "127\.0\.0\.1:3000"/],
    [['localhost:3000'], /the URL must start with http:\/\/ or https:\/\/, received "localhost:3000"/],
    [['ftp://127.0.0.1/'], /the URL must start with http:\/\/ or https:\/\/, received "ftp:\/\/127\.0\.0\.1\/"/],
    [['--nope', 'http://127.0.0.1/'], /Unknown option '--nope'/],
    [['http://127.0.0.1/', '--max'], /Option '--max <value>' argument missing/],
    [['--method', 'G ET', 'http://127.0.0.1/'], /--method must be an HTTP method, received "G ET"/],
    [['--header', 'novalue', 'http://127.0.0.1/'], /--header must be name:value, received "novalue"/],
    [['--header', 'bad name: x', 'http://127.0.0.1/'], /--header must be name:value, received "bad name: x"/],
    [['--body', 'x', '--body-file', bodyFile, 'http://127.0.0.1/'], /give --body or --body-file, not both/],
    [['--body-file', join(dir, 'missing'), 'http://127.0.0.1/'], /--body-file: cannot read .*missing: ENOENT/],
    [['--ca', join(dir, 'missing.pem'), 'http://127.0.0.1/'], /--ca: cannot read .*missing\.pem: ENOENT/],
    [['--expect-status', '2xx;304', 'http://127.0.0.1/'], /--expect-status must list statuses \(100-599\) or classes \(1xx-5xx\), e\.g\. 200,204 or 2xx, received "2xx;304"/],
    [['--max', '0', 'http://127.0.0.1/'], /--max must be an integer from 1 to 10000, received "0"/],
    [['--max', '1.5', 'http://127.0.0.1/'], /--max must be an integer from 1 to 10000, received "1\.5"/],
    [['--max', '10001', 'http://127.0.0.1/'], /--max must be an integer from 1 to 10000/],
    [['--max', 'ten', 'http://127.0.0.1/'], /--max must be an integer from 1 to 10000, received "ten"/],
    [['--step-seconds', '0.05', 'http://127.0.0.1/'], /--step-seconds must be a number from 0\.1 to 3600, received "0\.05"/],
    [['--step-seconds', '', 'http://127.0.0.1/'], /--step-seconds must be a number from 0\.1 to 3600, received ""/],
    [['--max-seconds', 'Infinity', 'http://127.0.0.1/'], /--max-seconds must be a number from 0\.1 to 86400, received "Infinity"/],
    [['--step-seconds', '5', '--max-seconds', '4', 'http://127.0.0.1/'], /--max-seconds \(4\) must be at least --step-seconds \(5\)/],
    [['--max-requests', '0', 'http://127.0.0.1/'], /--max-requests must be an integer >= 1, received "0"/],
    [['--timeout', '0', 'http://127.0.0.1/'], /--timeout must be an integer from 1 to 2147483647, received "0"/],
    // A negative number is the flag's value, told as out of range, not an ambiguous flag.
    [['--max-wait', '-1', 'http://127.0.0.1/'], /--max-wait must be a number >= 0, received "-1"/],
    [['--max', '-5', 'http://127.0.0.1/'], /--max must be an integer from 1 to 10000, received "-5"/],
    [['http://127.0.0.1/', '--step-seconds', '-.5'], /--step-seconds must be a number from 0\.1 to 3600, received "-\.5"/],
    [['--timeout', '-1', '--max', '4', 'http://127.0.0.1/'], /--timeout must be an integer from 1 to 2147483647, received "-1"/],
    [['--header', '-x', 'http://127.0.0.1/'], /Option '--header' argument is ambiguous/],
    [['--max-wait=-1', 'http://127.0.0.1/'], /--max-wait must be a number >= 0, received "-1"/]
  ]
  for (const [argv, message] of bad) await t.rejects(parseTuneArgs(argv), { name: 'Error', message }, argv.join(' '))
})

t.test('only loopback hosts, unless the user owns the host', async (t) => {
  for (const ip of ['127.0.0.1', '127.255.0.9', '::1', '0:0:0:0:0:0:0:1', '::ffff:127.0.0.1', '::FFFF:127.1.2.3']) t.ok(isLoopbackAddress(ip), ip)
  for (const ip of ['10.0.0.1', '192.0.2.1', '0.0.0.0', '::', '::2', '::ffff:10.0.0.1', 'fe80::1', '128.0.0.1']) t.notOk(isLoopbackAddress(ip), ip)

  const resolve = (table: Record<string, string[]>): Resolve => async (host) => {
    const addresses = table[host]
    if (addresses === undefined) throw new Error(`getaddrinfo ENOTFOUND ${host}`)
    return addresses
  }
  const hosts = resolve({ 'app.test': ['127.0.0.1', '::1'], 'split.test': ['127.0.0.1', '203.0.113.7'], 'empty.test': [] })
  t.equal(await notLoopback(new URL('http://127.0.0.1:3000/'), hosts), undefined)
  t.equal(await notLoopback(new URL('http://[::1]:3000/'), hosts), undefined)
  t.equal(await notLoopback(new URL('http://app.test/'), hosts), undefined)
  t.equal(await notLoopback(new URL('http://192.0.2.1/'), hosts), '192.0.2.1 is not a loopback address')
  t.equal(await notLoopback(new URL('http://[2001:db8::1]/'), hosts), '2001:db8::1 is not a loopback address')
  t.equal(await notLoopback(new URL('http://split.test/'), hosts), 'split.test resolves to 203.0.113.7, not a loopback address only')
  t.equal(await notLoopback(new URL('http://empty.test/'), hosts), 'empty.test resolves to no address, not a loopback address only')
  t.equal(await notLoopback(new URL('http://nowhere.test/'), hosts), 'cannot resolve nowhere.test: getaddrinfo ENOTFOUND nowhere.test')

  const local = await resolveAll('localhost')
  t.ok(local.length > 0 && local.every(isLoopbackAddress), `localhost: ${local.join(', ')}`)
})

function capture (resolve?: Resolve): { io: Io, out: { stdout: string, stderr: string } } {
  const out = { stdout: '', stderr: '' }
  return { out, io: { stdout: (text) => { out.stdout += text }, stderr: (text) => { out.stderr += text }, resolve } }
}

t.test('main: commands, help and refusals', async (t) => {
  for (const argv of [['--help'], ['-h'], ['help']]) {
    const { io, out } = capture()
    t.equal(await main(argv, io), EXIT.ok)
    t.equal(out.stdout, HELP)
  }
  const none = capture()
  t.equal(await main([], none.io), EXIT.usage)
  t.equal(none.out.stderr, 'a command is missing\n\n' + HELP)
  const unknown = capture()
  t.equal(await main(['tnue'], unknown.io), EXIT.usage)
  t.match(unknown.out.stderr, /^unknown command "tnue"\n/)

  const help = capture()
  t.equal(await main(['tune', '--help'], help.io), EXIT.ok)
  t.equal(help.out.stdout, TUNE_HELP)
  t.match(TUNE_HELP, /Only loopback hosts \(localhost, 127\.0\.0\.0\/8,\n::1\) are accepted unless --i-own-this-host is given\./)
  t.match(TUNE_HELP, /--i-own-this-host +allow a host that is not loopback/)

  const bad = capture()
  t.equal(await main(['tune', '--max', '0', 'http://127.0.0.1/'], bad.io), EXIT.usage)
  t.equal(bad.out.stderr, 'tune: --max must be an integer from 1 to 10000, received "0"\nRun "fastify-concurrency-limit tune --help" for the flags.\n')
  t.equal(bad.out.stdout, '')

  const remote = capture()
  t.equal(await main(['tune', 'http://192.0.2.1:8080/work'], remote.io), EXIT.usage)
  t.match(remote.out.stderr, /^tune: refusing to load 192\.0\.2\.1:8080: 192\.0\.2\.1 is not a loopback address\. tune sends real load; only loopback hosts are accepted unless you pass --i-own-this-host\n/)
  t.equal(remote.out.stdout, '', 'nothing sent, nothing measured')

  const named = capture(async () => ['198.51.100.4'])
  t.equal(await main(['tune', 'http://api.test/'], named.io), EXIT.usage)
  t.match(named.out.stderr, /refusing to load api\.test: api\.test resolves to 198\.51\.100\.4, not a loopback address only/)

  // --i-own-this-host: no check (this resolver would refuse), so the first
  // request goes out, to a port where nothing listens.
  const server = http.createServer().listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address() as AddressInfo
  server.close()
  const owned = capture(async () => ['198.51.100.4'])
  t.equal(await main(['tune', `http://localhost:${port}/`, '--i-own-this-host'], owned.io), EXIT.noRecommendation)
  t.match(owned.out.stdout, /failed: ECONNREFUSED/)
})

const FLAGS: TuneFlags = {
  url: new URL('http://127.0.0.1:3000/work'),
  method: 'GET',
  headers: {},
  expectStatus: '2xx',
  timeoutMs: 10_000,
  max: 256,
  levels: levelsUpTo(256),
  stepSeconds: 3,
  maxSeconds: 60,
  maxRequests: 1_000_000,
  json: false,
  iOwnThisHost: false
}

function result (steps: Step[], extra: Partial<SweepResult> = {}): SweepResult {
  return {
    steps,
    stoppedBy: 'knee',
    growing: false,
    preflight: { ok: true, latencyMs: 10, status: 200 },
    requests: steps.reduce((sum, s) => sum + s.sent, 1),
    elapsedMs: 12_345,
    ...extra
  }
}

t.test('the report', async (t) => {
  t.test('a knee, with the curve and the reasoning', async (t) => {
    const curve = [1, 2, 4, 8, 16, 32].map((n) => semaphore(6, 40)(n)).concat([semaphore(6, 40)(6, 'refine'), semaphore(6, 40)(5, 'refine')])
    const report = buildReport(FLAGS, result(curve))
    t.same(report.config, { maxConcurrency: 6, maxQueue: 6, queueTimeout: 100 })
    t.same(report.knee, {
      concurrency: 6,
      throughput: 150,
      share: 1,
      best: { concurrency: 6, throughput: 150 },
      below: { concurrency: 5, throughput: 125, share: 125 / 150 },
      beyond: { concurrency: 32, throughput: 150, p50Ms: 40 * Math.max(1, 32 / 6), p50Ratio: 40 * Math.max(1, 32 / 6) / 40 }
    })
    t.same(report.warnings, [])
    t.equal(report.elapsedSeconds, 12.345)
    const text = renderText(report)
    t.equal(text.split('\n').slice(0, 12).join('\n'), `Measured: GET http://127.0.0.1:3000/work, 8 levels in 12.3 s, 801 requests; stopped: throughput stopped growing and latency climbed.

  concurrency   2xx/s   p50 ms   p99 ms   errors   non-2xx   tool cpu
            1    25.0     40.0     60.0        0         0        10%
            2    50.0     40.0     60.0        0         0        10%
            4     100     40.0     60.0        0         0        10%
            5     125     40.0     60.0        0         0        10%   refined
            6     150     40.0     60.0        0         0        10%   <- knee, refined
            8     150     53.3     80.0        0         0        10%
           16     150      107      160        0         0        10%
           32     150      213      320        0         0        10%
`)
    t.match(text, /\n +6 \| #{40} \| #{5} +\| <- knee\n/)
    t.match(text, /\n +32 \| #{40} \| #{24} \|\n/)
    t.match(text, /Knee: 6 in flight reached 150\/s, 100% of the best \(150\/s at 6\); 5 reached 83%\./)
    t.match(text, /Past it, more in flight only waited: at 32, 150\/s with p50 213 ms \(5\.3x the knee's\)\./)
    t.match(text, /maxConcurrency 6: the knee\. Service time there S = 6 \/ 150\/s = 40\.0 ms \(p50 measured 40\.0 ms\),/)
    t.match(text, /maxQueue 6: a full queue waits 6 x S \/ 6 = 40\.0 ms, one service time/)
    t.match(text, /queueTimeout 100: p99 at the knee 60\.0 ms \+ a full queue's wait 40\.0 ms = 100 ms, rounded up\./)
    t.notMatch(text, /Note:/)

    const json = JSON.parse(JSON.stringify(report))
    t.same(Object.keys(json), ['target', 'bounds', 'stoppedBy', 'elapsedSeconds', 'requests', 'preflight', 'steps', 'knee', 'recommendation', 'config', 'warnings'])
  })

  t.test('a queueTimeout under 100 ms, a --max-wait budget, a custom --expect-status', async (t) => {
    const curve = [1, 2, 4, 8].map((n) => semaphore(2, 5)(n))
    const report = buildReport({ ...FLAGS, expectStatus: '200', maxWaitMs: 20 }, result(curve))
    const text = renderText(report)
    t.match(text, /concurrency +ok\/s +p50 ms +p99 ms +errors +other +tool cpu/)
    t.match(text, /maxQueue 8: the --max-wait budget of 20\.0 ms x 400\/s, rounded down; a full queue waits 8 x S \/ 2 = 20\.0 ms\./)
    t.match(text, /= 27\.5 ms, rounded up to 100 ms \(the plugin reads 1 to 99 ms as a likely unit mistake\)\./)
  })

  t.test('warnings', async (t) => {
    const growing = buildReport(FLAGS, result([step(1, 100, 10), step(2, 200, 10)], { stoppedBy: 'max', growing: true }))
    t.equal(growing.recommendation?.atLeast, true)
    t.match(growing.warnings[0], /Throughput still grew at concurrency 2, the largest level measured: the knee is there or higher \(rerun with --max 8\)\./)
    t.equal(growing.warnings.length, 1, 'p99 from 100 answers is no warning')
    t.match(renderText(growing), /maxConcurrency 2 \(at least\): the knee/)
    t.notMatch(renderText(growing), /Past it/, 'nothing measured above the knee')

    const interrupted = buildReport(FLAGS, result([step(1, 100, 10), step(2, 200, 10)], { stoppedBy: 'interrupted', growing: true }))
    t.match(interrupted.warnings[0], /the knee is there or higher \(let a rerun go on longer\)\./)
    t.match(interrupted.warnings[1], /The sweep was cut short \(interrupted\)/)

    const few = buildReport(FLAGS, result([step(1, 100, 10, { ok: 40 })]))
    t.match(few.warnings.join('\n'), /p99 at the knee comes from 40 answers only: a longer --step-seconds gives a steadier figure\./)

    const busy = buildReport(FLAGS, result([step(1, 100, 10), step(2, 150, 10, { toolCpu: 0.97 })]))
    t.match(busy.warnings.join('\n'), /This tool used 97% of a CPU core at concurrency 2: from there on the curve may show the load generator's limit/)

    const broken = buildReport(FLAGS, result([step(1, 100, 10), step(2, 150, 10, { ok: 90, otherStatus: 8, errors: 2, statuses: { 200: 90, 503: 8 }, errorCodes: { ECONNRESET: 2 } })], { stoppedBy: 'errors' }))
    t.match(broken.warnings.join('\n'), /At concurrency 2, 10 of 100 requests failed \(ECONNRESET x2, 503 x8\)\. If the endpoint already has a concurrency limit or a rate limit/)
    t.match(renderText(broken), /\n +2 +150 .* failed\n/)

    const idle = buildReport(FLAGS, result([step(1, 100, 10), step(512, 100, 5000, { idleSlots: 300 })], { stoppedBy: 'time' }))
    t.match(idle.warnings.join('\n'), /At concurrency 512, 300 of 512 request slots got no answer in the step: the endpoint is slower than --step-seconds allows; raise it\./)
    t.match(idle.warnings.join('\n'), /The sweep was cut short \(--max-seconds reached\): the recommendation comes from the levels measured so far\./)

    const requests = buildReport(FLAGS, result([step(1, 100, 10)], { stoppedBy: 'requests' }))
    t.match(requests.warnings.join('\n'), /cut short \(--max-requests reached\)/)
  })

  t.test('a share just under the threshold is not rounded up to it', async (t) => {
    const text = renderText(buildReport(FLAGS, result([step(8, 374, 21), step(9, 393, 22), step(32, 395, 81)])))
    t.match(text, /Knee: 9 in flight reached 393\/s, 99% of the best \(395\/s at 32\); 8 reached 94%\./)
  })

  t.test('no recommendation', async (t) => {
    const report = buildReport(FLAGS, result([step(1, 0, 10, { ok: 0, otherStatus: 100, statuses: { 500: 100 }, latency: null })], { stoppedBy: 'errors' }))
    t.equal(report.recommendation, undefined)
    t.equal(report.config, undefined)
    const text = renderText(report)
    t.match(text, /\n +1 +0\.0 +- +- +0 +100 .*failed\n/)
    t.match(text, /No recommendation: no level was measured without failures\./)
    t.match(text, /Note: At concurrency 1, 100 of 100 requests failed \(500 x100\)/)
  })

  t.test('the first request failed', async (t) => {
    const status = renderText(buildReport(FLAGS, result([], { stoppedBy: 'preflight', preflight: { ok: false, latencyMs: 3, status: 404, body: '' } })))
    t.equal(status, 'The first request to GET http://127.0.0.1:3000/work was answered 404, not 2xx. Nothing was swept.\n' +
      'Check the URL, --method, --header and --body, or say which statuses are success with --expect-status.\n')
  })
})

t.test('progress and banner', async (t) => {
  t.equal(progressLine(step(8, 1234.5, 6.25)), '      8 in flight: 1,235/s, p50 6.25 ms, p99 9.38 ms\n')
  t.equal(progressLine(step(6, 55.55, 120, { phase: 'refine', errors: 2, otherStatus: 1 })), '      6 in flight: 55.5/s, p50 120 ms, p99 180 ms, 3 failed (refining)\n')
  t.equal(progressLine(step(2, 0, 1, { latency: null, ok: 0 })), '      2 in flight: 0.0/s, no successful answer\n')
  t.equal(banner(FLAGS), 'tune: GET http://127.0.0.1:3000/work (success: 2xx)\n' +
    '  concurrency 1, 2, 4, 8, ... 256, 3 s each, then levels between the knee and the one below it;\n' +
    '  stops at the knee, on failures, or after 60 s or 1,000,000 requests (timeout 10,000 ms each).\n' +
    '  Ctrl-C stops and prints what was measured.\n')
  t.match(banner({ ...FLAGS, levels: [1, 2, 4, 8, 10] }), /concurrency 1, 2, 4, 8, 10, 3 s each/)
  const secret = { ...FLAGS, url: new URL('http://user:secret@127.0.0.1:3000/') }
  t.match(banner(secret), /^tune: GET http:\/\/user:\*\*\*@127\.0\.0\.1:3000\/ /, 'a password is not shown')
  t.equal(buildReport(secret, result([])).target.url, 'http://user:***@127.0.0.1:3000/')
  t.equal(rate(99.94), '99.9')
  t.equal(rate(1234567), '1,234,567')
  t.equal(ms(9.999), '10.00')
  t.equal(ms(12.34), '12.3')
  t.equal(ms(100), '100')
})
