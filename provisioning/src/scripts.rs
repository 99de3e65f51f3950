//! The Lua scripts of the job queue (`queue.rs` holds the logic that runs them). Each is a
//! `static` [`Script`] built once per process, so its SHA1 is computed once, not per call;
//! `invoke_async` sends `EVALSHA` and loads the script on `NOSCRIPT`.
//!
//! Every script touches only keys of the queue's one hash tag (`{<prefix>:prov}`), so each runs
//! in one Redis Cluster slot.

use std::sync::LazyLock;

use redis::Script;

pub(crate) static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local active = redis.call('GET', KEYS[1])
if active then return {0, active} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
return {1, ARGV[1]}
"#,
    )
});

/// A job withdrawn (cancelled) while a worker ran it keeps that state: the outcome scripts only
/// acknowledge the delivery then.
const WITHDRAWN: &str = r#"
local function withdrawn(job_key)
  local raw = redis.call('GET', job_key)
  if not raw then return false end
  return cjson.decode(raw)['state'] == 'cancelled'
end
"#;

/// Whether `consumer` holds `entry` in the group's pending list: the fence of every change a
/// delivery's holder makes.
const OWNS: &str = r#"
local function owns(stream, group, entry, consumer)
  return #redis.call('XPENDING', stream, group, entry, entry, 1, consumer) > 0
end
"#;

/// An outcome script with the [`WITHDRAWN`] and [`OWNS`] checks available.
fn outcome_script(body: &str) -> Script {
    Script::new(&format!("{WITHDRAWN}\n{OWNS}\n{body}"))
}

/// A script with the [`OWNS`] check available.
fn owner_script(body: &str) -> Script {
    Script::new(&format!("{OWNS}\n{body}"))
}

// The outcome scripts answer 1 (recorded), 0 (the job was withdrawn: only acknowledged) or -1
// (the caller no longer holds the entry: nothing changed).

// KEYS: stream, job, user, done. ARGV: entry, group, json, id, keep_done, ttl_secs, consumer
pub(crate) static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    outcome_script(
        r#"
if not owns(KEYS[1], ARGV[2], ARGV[1], ARGV[7]) then return -1 end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
if withdrawn(KEYS[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[6])
if redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
redis.call('LPUSH', KEYS[4], ARGV[4])
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[5]) - 1)
return 1
"#,
    )
});

// KEYS: stream, job, delayed. ARGV: entry, group, json, id, due, consumer
pub(crate) static DELAY: LazyLock<Script> = LazyLock::new(|| {
    outcome_script(
        r#"
if not owns(KEYS[1], ARGV[2], ARGV[1], ARGV[6]) then return -1 end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
if withdrawn(KEYS[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
return 1
"#,
    )
});

// KEYS: stream, job, dead, user. ARGV: entry, group, json, id, reason, at, ttl_secs, consumer
pub(crate) static BURY: LazyLock<Script> = LazyLock::new(|| {
    outcome_script(
        r#"
if not owns(KEYS[1], ARGV[2], ARGV[1], ARGV[8]) then return -1 end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
if withdrawn(KEYS[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[7])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'job', ARGV[4], 'reason', ARGV[5], 'at', ARGV[6])
if redis.call('GET', KEYS[4]) == ARGV[4] then redis.call('DEL', KEYS[4]) end
return 1
"#,
    )
});

// Marks the job of a fresh delivery running, atomically (a cancel in between is never
// overwritten); a finished or vanished job's entry is dropped instead. Returns the job (JSON) or
// nil. KEYS: stream, job. ARGV: entry, group, consumer, now
pub(crate) static DELIVER: LazyLock<Script> = LazyLock::new(|| {
    owner_script(
        r#"
if not owns(KEYS[1], ARGV[2], ARGV[1], ARGV[3]) then return false end
local raw = redis.call('GET', KEYS[2])
local job = raw and cjson.decode(raw)
local state = job and job['state']
if state ~= 'pending' and state ~= 'running' and state ~= 'delayed' then
  redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
  redis.call('XDEL', KEYS[1], ARGV[1])
  return false
end
job['state'] = 'running'
job['updated_at'] = tonumber(ARGV[4])
local json = cjson.encode(job)
redis.call('SET', KEYS[2], json)
return json
"#,
    )
});

// Resets the entry's idle time, only while `consumer` holds it (a worker that lost its delivery
// never takes it back). JUSTID: the delivery count is not incremented.
// KEYS: stream. ARGV: entry, group, consumer
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    owner_script(
        r#"
if not owns(KEYS[1], ARGV[2], ARGV[1], ARGV[3]) then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[2], ARGV[3], 0, ARGV[1], 'JUSTID')
return 1
"#,
    )
});

// Deletes the consumer if it holds no pending entries (DELCONSUMER would drop them).
// KEYS: stream. ARGV: group, consumer
pub(crate) static RELEASE_CONSUMER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"#,
    )
});

// Deletes consumers holding nothing that have been idle longer than ARGV[2] ms; returns their
// names. KEYS: stream. ARGV: group, min_idle_ms
pub(crate) static DELETE_IDLE_CONSUMERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local deleted = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    table.insert(deleted, f['name'])
  end
end
return deleted
"#,
    )
});

// KEYS: delayed, stream, job. ARGV: id
pub(crate) static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local raw = redis.call('GET', KEYS[3])
if not raw then return 0 end
local job = cjson.decode(raw)
if job['state'] ~= 'delayed' then return 0 end
job['state'] = 'pending'
redis.call('SET', KEYS[3], cjson.encode(job))
redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
return 1
"#,
    )
});

// KEYS: job, user, stream. ARGV: id, json
pub(crate) static REQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local active = redis.call('GET', KEYS[2])
if active and active ~= ARGV[1] then return {0, active} end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PERSIST', KEYS[1])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
return {1, ARGV[1]}
"#,
    )
});

// KEYS: user, job, delayed. ARGV: id, reason, now, ttl_secs
pub(crate) static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local raw = redis.call('GET', KEYS[2])
if not raw then return 1 end
local job = cjson.decode(raw)
job['state'] = 'cancelled'
job['last_error'] = ARGV[2]
job['updated_at'] = tonumber(ARGV[3])
job['next_run_at'] = cjson.null
redis.call('SET', KEYS[2], cjson.encode(job), 'EX', ARGV[4])
return 1
"#,
    )
});
