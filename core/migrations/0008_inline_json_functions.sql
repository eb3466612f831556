-- PostgreSQL inlines a one-expression SQL function into the statement that
-- calls it (no executor of its own per call) only when the function is
-- declared no less volatile than its body. The bodies of these four call
-- stable functions (row_to_json and convert_to depend on the session's
-- settings, extract on its time zone), so declared immutable they ran as
-- separate calls: ~90 us of a single-row GET and ~140 us of every write's
-- outbox insert went to that (bench/pgfunctions.py). Stable is what they
-- are; the results are the same bytes (each pool connection pins its
-- time zone to UTC: core/db.py).
alter function project_json(projects) stable;
alter function user_json(users) stable;
alter function change_event(text, bigint, integer, text) stable;
alter function outbox_call(bigint, timestamptz) stable;
