// A worker's side of leaving: once drained it waits for the primary's word
// before it exits, so that a connection the primary handed it meanwhile is
// handed back instead of lost. The test plays the primary over IPC.
import t from 'tap'
import { fork } from 'node:child_process'
import { once } from 'node:events'
import { fileURLToPath } from 'node:url'
import { request } from 'undici'
import { TAG } from '../lib/cluster/messages.js'
import { sleep } from './helpers/server.js'

const fixture = fileURLToPath(new URL('./fixtures/cluster-worker.ts', import.meta.url))

t.test('a drained worker waits for the primary before it exits', async (t) => {
  const child = fork(fixture, { execArgv: process.execArgv, stdio: 'inherit' })
  t.teardown(() => { child.kill('SIGKILL') })
  const messages: Array<{ type?: string, app?: string, port?: number }> = []
  const seen = (match: (m: typeof messages[number]) => boolean): Promise<typeof messages[number]> => new Promise((resolve) => {
    const found = messages.find(match)
    if (found !== undefined) return resolve(found)
    const listener = (m: typeof messages[number]): void => {
      if (!match(m)) return
      child.removeListener('message', listener)
      resolve(m)
    }
    child.on('message', listener)
  })
  child.on('message', (m: typeof messages[number]) => { messages.push(m) })
  const listening = await seen((m) => m.type === 'listening')
  const response = await request(`http://127.0.0.1:${listening.port as number}/`)
  t.equal(await response.body.text(), 'ok')
  const exited = once(child, 'exit')
  child.send({ tag: TAG, type: 'drain' })
  child.send({ tag: TAG, type: 'drain' }) // a second one changes nothing
  await seen((m) => m.type === 'drained')
  t.same(messages.filter((m) => m.app === 'closed' || m.type === 'drained').map((m) => m.app ?? m.type), ['closed', 'drained'],
    "the app's onClose hooks ran first")
  await sleep(300)
  t.equal(child.exitCode, null, 'still there until the primary answers')
  child.send({ hello: 'an app message' })
  await sleep(50)
  t.equal(child.exitCode, null, "the app's own messages are not the answer")
  child.send({ tag: TAG, type: 'exit' })
  t.same(await exited, [0, null], 'then it exits 0')
  t.same(messages.filter((m) => m.type === 'drained' || m.type === 'exiting').map((m) => m.type), ['drained', 'exiting'],
    'drained once, and its last word written before it exits')
})

t.test('an onClose hook that fails: the worker still waits for the primary, then exits 1 and says why', async (t) => {
  const child = fork(fixture, { execArgv: process.execArgv, stdio: ['ignore', 'inherit', 'pipe', 'ipc'], env: { ...process.env, FCL_FAIL_CLOSE: '1' } })
  t.teardown(() => { child.kill('SIGKILL') })
  let stderr = ''
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk })
  const types: string[] = []
  const drained = new Promise<void>((resolve) => {
    child.on('message', (m: { type?: string }) => {
      if (m.type !== undefined) types.push(m.type)
      if (m.type === 'listening') child.send({ tag: TAG, type: 'drain' })
      if (m.type === 'drained') resolve()
    })
  })
  const exited = once(child, 'exit')
  await drained
  await sleep(200)
  t.equal(child.exitCode, null, 'still there until the primary answers')
  child.send({ tag: TAG, type: 'exit' })
  t.same(await exited, [1, null])
  t.match(stderr, /worker \(pid \d+\) failed to close its app: Error: onClose failed on purpose/)
  t.same(types.slice(-2), ['drained', 'exiting'])
})
