import { createHash, randomBytes } from 'node:crypto'
import type { Limiter, PermitSource } from '../limiter.js'
import type { RedisClient, RedisSubscriber, StoreSettings } from './options.js'

/** The shared store's state for one pool, in its stats. */
export interface StoreStats {
  /** Redis key of the pool's leases. */
  key: string
  /** Leases this instance holds now (one per admitted request, unless Redis failed). */
  leases: number
  /** Permits out across every instance at the last answer from Redis. */
  fleetInFlight: number
  /** False from a failed Redis call until Redis answers again. */
  available: boolean
  /** Redis calls that failed or took longer than `timeout`. */
  errors: number
  /** Requests refused because Redis was unavailable (onStoreError 'refuse'). */
  refused: number
  /** Requests admitted without a lease while Redis was unavailable ('allow' or 'local'). */
  unleased: number
}

interface Script {
  lua: string
  sha: string
}

function script (lua: string): Script {
  return { lua, sha: createHash('sha1').update(lua).digest('hex') }
}

// The clock of every lease is Redis's own (TIME), never an instance's: the
// instances' clocks may disagree, the store's is one. Leases are the members
// of one sorted set per pool, scored by their expiry in milliseconds.
const NOW = `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
`

/**
 * KEYS[1] leases, KEYS[2] turns, KEYS[3] seen; ARGV[1] the limit, ARGV[2]
 * leaseMs, ARGV[3] the instance, ARGV[4] staleMs, ARGV[5] the channel,
 * ARGV[6] how many of the ids are for requests already running, ARGV[7..]
 * new lease ids.
 * Purges expired leases and the turns of instances not seen for staleMs;
 * adds the ids of running requests whatever the count (requests admitted
 * while Redis was unavailable: they hold a permit, the other instances must
 * see it); then as many of the other ids as the instance's turn allows, in
 * order. Returns { other ids added, leases out now }.
 *
 * Turns: an instance that asks for permits and does not get all it asked
 * for waits in Redis, in KEYS[2], scored by twice the permits it has taken
 * since it began waiting, plus 1 if it began to wait after others: it then
 * starts level with the instance that has taken the fewest, and after it.
 * KEYS[3] holds when each was last heard from. The free permits go one at
 * a time to whoever has taken the fewest, as if every waiting instance
 * asked for all of them: this instance takes its part of that share-out,
 * and leaves the rest to the others.
 *
 * Why turns, and why counted in permits: a freed permit is announced to
 * every instance at once, and without turns it went to whichever call
 * reached Redis first. That race is decided by much the same timing at
 * every release, so one instance kept winning: about 70% of a pool of 4
 * between two equal instances, whose waiters then timed out on the other.
 * With turns the outcome of a release does not depend on which call
 * arrives first. Counting the permits taken keeps that true when several
 * permits are free at once, where a queue that sends a served instance to
 * its back still favours whoever calls first. The cost is bounded: a
 * permit kept for a turn waits for an instance woken by the same message
 * (or, if that one died or stalled, for staleMs and a poll), and a permit
 * left over because an instance asked for less than its part is announced
 * again.
 */
const ACQUIRE = script(NOW + `redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local lease = tonumber(ARGV[2])
local me = ARGV[3]
local running = tonumber(ARGV[6])
for i = 7, 6 + running do redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) end
local count = redis.call('ZCARD', KEYS[1])
if count > 0 then redis.call('PEXPIRE', KEYS[1], lease * 2) end
local free = tonumber(ARGV[1]) - count
local wanted = #ARGV - 6 - running
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[4]))
if #stale > 0 then
  redis.call('ZREM', KEYS[2], unpack(stale))
  redis.call('ZREM', KEYS[3], unpack(stale))
end
local waited = redis.call('ZSCORE', KEYS[2], me)
if wanted == 0 then
  if waited then
    redis.call('ZREM', KEYS[2], me)
    redis.call('ZREM', KEYS[3], me)
    if free > 0 and redis.call('ZCARD', KEYS[2]) > 0 then redis.call('PUBLISH', ARGV[5], 0) end
  end
  return { 0, count }
end
if not waited then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  waited = first[2] and math.floor(first[2] / 2) * 2 + 1 or 0
  redis.call('ZADD', KEYS[2], waited, me)
end
waited = tonumber(waited)
local share = 0
if free > 0 then
  local turns = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local n = #turns / 2
  local mine = 0
  for i = 1, n do if turns[2 * i - 1] == me then mine = i end end
  -- Deal the free permits level by level: at each level every instance
  -- that has taken that many or fewer takes one; the last, partial level
  -- goes to the first in order.
  local function taken (j) return math.floor(tonumber(turns[2 * j]) / 2) end
  local left, level, active, i = free, taken(1), 0, 1
  while left > 0 do
    while i <= n and taken(i) <= level do
      active = active + 1
      i = i + 1
    end
    local nextLevel = i <= n and taken(i) or nil
    if nextLevel and left >= active * (nextLevel - level) then
      if mine <= active then share = share + nextLevel - level end
      left = left - active * (nextLevel - level)
      level = nextLevel
    else
      if mine <= active then
        share = share + math.floor(left / active)
        if mine <= left % active then share = share + 1 end
      end
      left = 0
    end
  end
end
local added = math.min(wanted, share)
for i = 7 + running, 6 + running + added do redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) end
if added > 0 then redis.call('PEXPIRE', KEYS[1], lease * 2) end
if added < wanted then
  redis.call('ZADD', KEYS[2], waited + 2 * added, me)
  redis.call('ZADD', KEYS[3], now, me)
  redis.call('PEXPIRE', KEYS[2], lease * 2)
  redis.call('PEXPIRE', KEYS[3], lease * 2)
else
  redis.call('ZREM', KEYS[2], me)
  redis.call('ZREM', KEYS[3], me)
end
-- Permits left over that others wait for: those others were woken by the
-- release and may have asked before this call; tell them again.
if added > 0 and free > added and redis.call('ZCARD', KEYS[2]) > (added < wanted and 1 or 0) then
  redis.call('PUBLISH', ARGV[5], 0)
end
return { added, count + added }
`)

/**
 * KEYS[1] leases; ARGV[1] the channel, ARGV[2..] lease ids. Removes them and
 * tells every instance that permits are free. Returns how many were held,
 * and the permits out across the fleet now.
 */
const RELEASE = script(`local n = redis.call('ZREM', KEYS[1], unpack(ARGV, 2))
if n > 0 then redis.call('PUBLISH', ARGV[1], n) end
return { n, redis.call('ZCARD', KEYS[1]) }
`)

/**
 * KEYS[1] leases; ARGV[1] leaseMs, ARGV[2..] lease ids. Extends them, and
 * puts back any that Redis lost (a restart without persistence): their
 * requests still run, so they still count against the limit.
 */
const RENEW = script(NOW + `local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], lease * 2)
return #ARGV - 1
`)

class StoreTimeoutError extends Error {
  constructor (ms: number) {
    super(`Redis did not answer within ${ms} ms`)
  }
}

function isNoScript (err: unknown): boolean {
  return err instanceof Error && err.message.startsWith('NOSCRIPT')
}

/** Runs a script by its digest, loading it if Redis does not have it (after a restart). */
async function run (redis: RedisClient, s: Script, keys: string[], args: Array<string | number>): Promise<unknown> {
  try {
    return await redis.evalsha(s.sha, keys.length, ...keys, ...args)
  } catch (err) {
    if (!isNoScript(err)) throw err
    return await redis.eval(s.lua, keys.length, ...keys, ...args)
  }
}

/**
 * A call that fails after `ms`. ioredis queues commands while it reconnects
 * and retries them for long after: without a timer of our own, a request
 * could wait on a Redis that is down. `late` receives the answer of a call
 * that timed out but went through after all.
 */
function timed (call: Promise<unknown>, ms: number, late?: (value: unknown) => void): Promise<unknown> {
  return new Promise((resolve, reject) => {
    let timedOut = false
    const timer = setTimeout(() => {
      timedOut = true
      reject(new StoreTimeoutError(ms))
    }, ms)
    timer.unref()
    call.then((value) => {
      if (!timedOut) {
        clearTimeout(timer)
        resolve(value)
      } else {
        late?.(value)
      }
    }, (err: unknown) => {
      clearTimeout(timer)
      reject(err)
    })
  })
}

/**
 * A pool's permits as leases in Redis, shared by every instance whose pool
 * has the same key. One instance asks for permits for its waiters in one
 * call at a time: waiters that arrive meanwhile are asked for together in
 * the next. A permit freed anywhere is announced on the pool's channel and
 * wakes the instances with waiters; a poll every min(leaseMs / 4, 250) ms
 * covers a lost message and leases that expired. Instances that wait take
 * turns, kept in Redis (see ACQUIRE); an instance gives up its turn when
 * its last waiter leaves or it closes.
 *
 * Leases are interchangeable: a request does not carry its own, the
 * instance keeps the ids it holds and gives one back per permit released
 * (after the response closed and the handler settled, as for a local pool).
 * One timer renews every lease the instance holds, in one call.
 */
export class RedisPermits implements PermitSource {
  readonly #limiter: Limiter
  readonly #redis: RedisClient
  readonly #settings: StoreSettings
  readonly #key: string
  /** The leases, turns and seen keys, for ACQUIRE. */
  readonly #keys: string[]
  readonly #channel: string
  readonly #idPrefix = randomBytes(9).toString('base64url') + ':'
  #nextId = 0
  readonly #pollMs: number
  /** An instance not heard from for this long while it waits loses its turn. */
  readonly #staleMs: number
  /** While Redis fails: the most permits this instance admits without one. */
  readonly #fallbackLimit: number
  #subscriber: RedisSubscriber | null = null

  /** Lease ids held for admitted requests. */
  readonly #held: string[] = []
  /** An acquiring call is out; `asking`: for how many waiters. */
  #calling = false
  #asking = 0
  #askAgain = false
  #wakeScheduled = false
  /** The last answer found no free permit: wait for one to be announced. */
  #full = false
  /** This instance may have a turn in Redis (it asked and did not get all it asked for). */
  #waiting = false
  #closed = false
  #available = true
  #settleUntil = 0
  #pollTimer: NodeJS.Timeout | null = null
  #renewTimer: NodeJS.Timeout | null = null

  #fleetInFlight = 0
  #errors = 0
  #refused = 0
  #unleased = 0

  constructor (limiter: Limiter, settings: StoreSettings) {
    this.#limiter = limiter
    this.#settings = settings
    this.#redis = settings.redis
    this.#key = settings.nameSpace + limiter.name
    this.#keys = [this.#key, this.#key + ':turns', this.#key + ':seen']
    this.#channel = this.#key + ':freed'
    this.#pollMs = Math.max(1, Math.min(250, Math.floor(settings.leaseMs / 4)))
    // A waiting instance asks at least once a poll interval: three missed
    // ones and it is taken for dead, so that its turn cannot hold the pool.
    this.#staleMs = 3 * this.#pollMs
    this.#fallbackLimit = settings.onStoreError === 'allow'
      ? limiter.maxConcurrency
      : Math.max(1, Math.floor(limiter.maxConcurrency / settings.instances))
    this.#subscribe()
  }

  #subscribe (): void {
    const subscriber = this.#subscriber = this.#redis.duplicate()
    subscriber.on('message', this.#onMessage)
    // The subscriber reconnects and subscribes again by itself; until then
    // the poll wakes the waiters. Its errors are the client's to log.
    subscriber.on('error', noop)
    subscriber.subscribe(this.#channel).then(undefined, noop)
  }

  // The subscriber is this pool's own: every message is a permit freed.
  #onMessage = (): void => {
    this.#full = false
    this.#pump()
  }

  // Called from inside `enqueue`: the waiter is admitted or refused after
  // its caller has seen it queued, never during the call.
  wake (): void {
    if (this.#wakeScheduled) return
    this.#wakeScheduled = true
    process.nextTick(this.#wakePump)
  }

  #wakePump = (): void => {
    this.#wakeScheduled = false
    this.#pump()
  }

  headroom (): number {
    if (this.#full || !this.#available) return this.#asking
    return this.#limiter.limit - this.#limiter.inFlight
  }

  released (): void {
    // A permit admitted without a lease (Redis was down) goes first: the
    // leases then still count every request that holds one. A lease given
    // back is announced to every instance at once, this one included: its
    // own waiters ask then, with no head start on the others'.
    if (this.#trim() && this.#available) return
    // A local slot freed without a permit, or Redis is down: a waiter may fit now.
    if (this.#limiter.queued > 0) this.#pump()
  }

  /**
   * Gives back the leases no running request needs, the oldest first (ids
   * turn over). True if it gave any back.
   */
  #trim (): boolean {
    const surplus = this.#held.length - this.#limiter.inFlight
    if (surplus <= 0) return false
    const ids = this.#held.splice(0, surplus)
    this.#call(RELEASE, [this.#channel, ...ids]).then(this.#releasedAll, this.#failed)
    return true
  }

  #releasedAll = (reply: unknown): void => {
    this.#fleetInFlight = (reply as [number, number])[1]
  }

  close (): Promise<void> | void {
    this.#closed = true
    this.#subscriber?.disconnect()
    this.#subscriber = null
    if (!this.#waiting && !this.#calling) return
    this.#waiting = false
    // Its waiters are gone: so is its turn. A call still out goes before
    // this one on the same connection. Bounded by the store's timeout.
    return this.#acquire(0, []).then(noop, noop)
  }

  stats (): StoreStats {
    return {
      key: this.#key,
      leases: this.#held.length,
      fleetInFlight: this.#fleetInFlight,
      available: this.#available,
      errors: this.#errors,
      refused: this.#refused,
      unleased: this.#unleased
    }
  }

  #call (s: Script, args: Array<string | number>, late?: (value: unknown) => void, keys = [this.#key]): Promise<unknown> {
    return timed(run(this.#redis, s, keys, args), this.#settings.timeout, late)
  }

  #acquire (running: number, ids: string[], late?: (value: unknown) => void): Promise<unknown> {
    const args = [this.#limiter.maxConcurrency, this.#settings.leaseMs, this.#idPrefix, this.#staleMs, this.#channel, running, ...ids]
    return this.#call(ACQUIRE, args, late, this.#keys)
  }

  /** Asks Redis for permits for the waiters not asked for yet. */
  #pump (): void {
    if (this.#closed) return
    if (this.#calling) {
      this.#askAgain = true
      return
    }
    const limiter = this.#limiter
    if (!this.#available) {
      this.#fallback()
      return
    }
    // Requests admitted without a lease while Redis was unavailable.
    const running = limiter.inFlight - this.#held.length
    // Just back: the other instances put their running requests back first.
    const settling = this.#settleUntil > performance.now()
    const wanted = settling ? 0 : Math.min(limiter.queued, limiter.limit - limiter.inFlight)
    // Without a waiter to ask for, a call still gives up this instance's turn.
    if (wanted <= 0 && running <= 0 && !this.#waiting) {
      if (settling && limiter.queued > 0) {
        this.#fallback()
        this.#poll()
      }
      return
    }
    const ids: string[] = []
    for (let i = 0; i < running + wanted; i++) ids.push(this.#idPrefix + (this.#nextId++).toString(36))
    this.#calling = true
    this.#asking = wanted
    this.#askAgain = false
    this.#acquire(running, ids, (late) => {
      // The call timed out but went through: give back what it took.
      const added = running + (late as [number, number])[0]
      if (added > 0) this.#call(RELEASE, [this.#channel, ...ids.slice(0, added)]).then(noop, noop)
    }).then((reply) => {
      const [added, inFlight] = reply as [number, number]
      this.#calling = false
      this.#asking = 0
      this.#fleetInFlight = inFlight
      this.#full = added < wanted
      this.#waiting = this.#full
      for (let i = 0; i < running + added; i++) this.#held.push(ids[i])
      // Waiters may have left (timed out, client gone) while Redis answered.
      let granted = 0
      while (granted < added && limiter.grant()) granted++
      // Leases nobody needs now: those of waiters that left, and of running
      // requests that ended while Redis answered.
      this.#trim()
      if (this.#held.length > 0 && this.#renewTimer === null) this.#startRenewing()
      if (limiter.queued > 0) {
        if (this.#askAgain || !this.#full) {
          this.#pump()
        } else {
          // No permit for them anywhere: the queue's bound applies.
          limiter.trimQueue()
          this.#poll()
        }
      }
      // The waiters it asked for are gone: give up the turn.
      if (limiter.queued === 0 && this.#waiting) this.#pump()
    }, (err: unknown) => {
      this.#calling = false
      this.#asking = 0
      this.#failed(err)
      this.#fallback()
    })
  }

  /** Redis is unavailable: admit or refuse the waiters as `onStoreError` says. */
  #fallback (): void {
    const limiter = this.#limiter
    if (this.#settings.onStoreError === 'refuse') {
      this.#refused += limiter.queued
      limiter.refuseWaiters()
      return
    }
    while (limiter.inFlight < this.#fallbackLimit && limiter.grant()) this.#unleased++
    limiter.trimQueue()
  }

  #failed = (_err: unknown): void => {
    this.#errors++
    if (!this.#available) return
    this.#available = false
    this.#probe()
    // Waiters get what onStoreError says now, not at their timeout.
    if (this.#limiter.queued > 0) this.#pump()
  }

  /** While Redis is unavailable, asks it every poll interval whether it is back. */
  #probe (): void {
    const timer = setTimeout(() => {
      this.#acquire(0, []).then((reply) => {
        this.#fleetInFlight = (reply as [number, number])[1]
        this.#available = true
        // The call gave up this instance's turn, if it had one.
        this.#waiting = false
        // Each instance finds Redis back at its own probe, within a poll
        // interval of the others: until they all have put back the leases of
        // the requests they admitted without one, new permits would be
        // counted against a fleet that looks emptier than it is.
        if (this.#settings.onStoreError !== 'refuse') this.#settleUntil = performance.now() + this.#pollMs
        this.#full = false
        this.#pump()
      }, () => {
        this.#errors++
        this.#probe()
      })
    }, this.#pollMs)
    timer.unref()
  }

  /** Asks again after a poll interval: a permit may have expired, or its message been lost. */
  #poll (): void {
    if (this.#pollTimer !== null) return
    this.#pollTimer = setTimeout(() => {
      this.#pollTimer = null
      this.#full = false
      this.#pump()
    }, this.#pollMs)
    this.#pollTimer.unref()
  }

  #startRenewing (): void {
    const every = Math.max(1, Math.floor(this.#settings.leaseMs / 3))
    this.#renewTimer = setInterval(() => {
      if (this.#held.length === 0) {
        clearInterval(this.#renewTimer as NodeJS.Timeout)
        this.#renewTimer = null
        return
      }
      this.#call(RENEW, [this.#settings.leaseMs, ...this.#held]).then(noop, this.#failed)
    }, every)
    this.#renewTimer.unref()
  }
}

function noop (): void {}
