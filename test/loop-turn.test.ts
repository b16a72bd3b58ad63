import t from 'tap'
import { setImmediate as immediate } from 'node:timers/promises'
import { LoopTurn } from '../lib/loop-turn.js'

t.test('arrivals read how long the loop has run since it last came round', async (t) => {
  let now = 1000
  const turn = new LoopTurn(() => now)
  t.equal(turn.arrive(), 0, 'the first arrival after a quiet spell starts the clock')
  now += 7
  t.equal(turn.arrive(), 7, 'a second arrival in the same turn sees the work done since')
  now += 30
  t.equal(turn.arrive(), 37)
  // The loop comes round: the turn ends at the check phase.
  await immediate()
  now += 2
  t.equal(turn.arrive(), 2, 'the next turn starts when the previous one ended')
  await immediate()
  // A turn without arrivals: the server went quiet and the marking stops.
  await immediate()
  now += 5000
  t.equal(turn.arrive(), 0, 'a quiet spell does not count as a busy turn')
  turn.stop()
})

t.test('stop() ends the marking; an arrival after it starts afresh', async (t) => {
  let now = 0
  const turn = new LoopTurn(() => now)
  turn.arrive()
  now += 50
  turn.stop()
  turn.stop()
  t.equal(turn.arrive(), 0)
  turn.stop()
})

t.test('the default clock is performance.now()', async (t) => {
  const turn = new LoopTurn()
  t.equal(turn.arrive(), 0)
  const started = performance.now()
  while (performance.now() - started < 5);
  t.ok(turn.arrive() >= 5, 'five milliseconds of synchronous work count')
  turn.stop()
})
