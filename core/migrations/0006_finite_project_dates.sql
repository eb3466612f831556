-- PUT and PATCH passed dates to asyncpg, which writes Python's first and last
-- dates (0001-01-01, 9999-12-31) as -infinity and infinity: such a project
-- read as no date at all (and every later PATCH of it failed). Those rows get
-- back the dates they were sent, under a new version (their ETag: what a
-- client cached has changed), and no row holds an infinite date again.
update projects
set starts_on = case starts_on when '-infinity' then date '0001-01-01'
                               when 'infinity' then date '9999-12-31'
                               else starts_on end,
    ends_on = case ends_on when '-infinity' then date '0001-01-01'
                           when 'infinity' then date '9999-12-31'
                           else ends_on end,
    version = version + 1
where not isfinite(starts_on) or not isfinite(ends_on);
alter table projects
    add constraint projects_dates_finite check (isfinite(starts_on) and isfinite(ends_on));
