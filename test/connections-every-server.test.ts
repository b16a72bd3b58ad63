import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import dns from 'node:dns'
import { once } from 'node:events'
import { connect } from 'node:net'
import { Client } from 'undici'
import concurrencyLimit, { type ConcurrencyLimitOptions } from '../lib/index.js'
import { get, waitFor } from './helpers/server.js'

// Many machines resolve localhost to 127.0.0.1 and ::1, and Fastify then
// listens with one server per address; this one resolves it to 127.0.0.1
// only. The stub lives in this file so that no other test's process sees it.
async function listenOnBoth (app: FastifyInstance): Promise<number> {
  const lookup = dns.lookup
  const both = [{ address: '127.0.0.1', family: 4 }, { address: '::1', family: 6 }]
  dns.lookup = function (...args: unknown[]) {
    const [hostname, options, callback] = args as [string, { all?: boolean }, (err: null, all: typeof both) => void]
    if (hostname === 'localhost' && options?.all === true) process.nextTick(callback, null, both)
    else Reflect.apply(lookup, dns, args)
  } as typeof dns.lookup
  try {
    await app.listen({ port: 0 })
  } finally {
    dns.lookup = lookup
  }
  const port = (app.server.address() as { port: number }).port
  const families = app.addresses().map((a) => (a as { family: string }).family).sort()
  if (families.join() !== 'IPv4,IPv6') throw new Error(`expected a server on 127.0.0.1 and one on ::1, got ${families.join()}`)
  return port
}

interface Setup { app: FastifyInstance, scope: FastifyInstance, warnings: string[] }

async function setup (t: Test, options: ConcurrencyLimitOptions, where: 'root' | 'child' = 'root', before?: (app: FastifyInstance) => void): Promise<Setup> {
  const warnings: string[] = []
  const app = Fastify({
    forceCloseConnections: true,
    logger: { level: 'warn', stream: { write: (line: string) => { warnings.push(JSON.parse(line).msg) } } }
  })
  t.teardown(() => app.close())
  before?.(app)
  let scope: FastifyInstance = app
  const plugin = async (instance: FastifyInstance): Promise<void> => {
    await instance.register(concurrencyLimit, options)
    instance.get('/x', async () => 'x')
    scope = instance
  }
  if (where === 'root') await plugin(app)
  else await app.register(plugin)
  return { app, scope, warnings }
}

/**
 * The answer to one request on a new connection. `Connection: close` ends an
 * admitted connection too, so that a missed refusal fails the test, not hangs it.
 */
async function oneRequest (port: number, host: string): Promise<string> {
  const socket = connect(port, host)
  let answer = ''
  socket.setEncoding('utf8')
  socket.on('data', (chunk: string) => { answer += chunk })
  await once(socket, 'connect')
  socket.write('GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  await once(socket, 'close')
  return answer
}

function client (t: Test, origin: string): Client {
  const c = new Client(origin)
  t.teardown(() => c.destroy())
  return c
}

for (const where of ['root', 'child'] as const) {
  t.test(`maxConnections is one budget across 127.0.0.1 and ::1 (plugin in the ${where} context)`, async (t) => {
    const { app, scope, warnings } = await setup(t, { maxConnections: 2 }, where)
    const port = await listenOnBoth(app)
    const connections = () => scope.concurrencyLimit.connections()
    const v4 = client(t, `http://127.0.0.1:${port}`)
    const v6 = client(t, `http://[::1]:${port}`)
    t.equal((await get(v4, '/x')).body, 'x')
    t.equal((await get(v6, '/x')).body, 'x')
    t.match(connections(), { maxConnections: 2, open: 2, peakOpen: 2, refused: 0 }, 'both servers count')

    for (const host of ['::1', '127.0.0.1']) {
      const answer = await oneRequest(port, host)
      t.match(answer, /^HTTP\/1.1 503 Service Unavailable\r\n/, `a third connection, on ${host}, is refused`)
      t.match(answer, /\r\nConnection: close\r\n/)
    }
    t.match(connections(), { open: 2, refused: 2 })

    // Room made on one address is room on the other.
    await v4.close()
    await waitFor(() => connections()?.open === 1, 2000, 'the closed connection to leave the count')
    const again = client(t, `http://[::1]:${port}`)
    t.equal((await get(again, '/x')).body, 'x')
    t.match(connections(), { open: 2, peakOpen: 2, refused: 2 })
    t.match(await oneRequest(port, '::1'), /^HTTP\/1.1 503 /)
    t.same(warnings.filter((w) => /maxConnections/.test(w)), [], 'every server is guarded: nothing to warn about')
  })
}

t.test('a connection accepted while an earlier onListen hook is still running is counted', async (t) => {
  let release = (): void => {}
  const held = new Promise<void>((resolve) => { release = resolve })
  t.teardown(() => release())
  // Added before the plugin, this hook runs before any hook of the plugin;
  // listen() resolves while it waits.
  const { app, scope } = await setup(t, { maxConnections: 1 }, 'root', (app) => {
    app.addHook('onListen', async () => { await held })
  })
  const port = await listenOnBoth(app)
  const first = client(t, `http://[::1]:${port}`)
  t.equal((await get(first, '/x')).body, 'x')
  t.match(scope.concurrencyLimit.connections(), { open: 1 })
  t.match(await oneRequest(port, '::1'), /^HTTP\/1.1 503 /, 'the bound holds before the hooks are done')
  release()
})

t.test('a Fastify that hides its other servers draws one warning naming them', async (t) => {
  // Stands in for a future Fastify that renames or drops the private field.
  const symbolsOf = Object.getOwnPropertySymbols
  Object.getOwnPropertySymbols = (object: object) => symbolsOf(object).filter((s) => s.description !== 'fastify.serverBindings')
  let setupDone: Setup
  try {
    setupDone = await setup(t, { maxConnections: 2 })
  } finally {
    Object.getOwnPropertySymbols = symbolsOf
  }
  const { app, warnings } = setupDone
  const port = await listenOnBoth(app)
  const ours = warnings.filter((w) => /maxConnections/.test(w))
  t.equal(ours.length, 1, 'one warning')
  t.match(ours[0], `[::1]:${port}`)
  t.notMatch(ours[0], `127.0.0.1:${port}`, 'the guarded server is not named')
})
