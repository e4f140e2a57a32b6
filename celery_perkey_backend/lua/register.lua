-- Registers a process's inbox as a waiter of a task and reads the task's state, in one
-- atomic step: a result stored before it is returned here, one stored after it finds
-- the inbox (store.lua). No wake-up can fall between the two.
--
-- KEYS: result, state, watchers
-- ARGV: inbox, ttl_ms
--
-- result    the task's result list
-- state     the task's latest intermediate state
-- watchers  the inboxes of the processes waiting on the task
-- inbox     this process's inbox key
-- ttl_ms    how long the registration lasts unless renewed
--
-- Returns {ready element or false, intermediate state or false}.
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return {redis.call('LINDEX', KEYS[1], 0), redis.call('GET', KEYS[2])}
