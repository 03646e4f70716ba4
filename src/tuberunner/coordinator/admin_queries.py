"""Read queries of the admin API (SQLAlchemy Core), and the admin shapes of their rows (spec §5).

Each listing is two statements on one read connection: a `count(*)` with the filters, then one page
(`ORDER BY <field>, id ASC LIMIT/OFFSET`) joined to what it shows (runner, parent job), so a page costs
the same whatever the table size beyond the sort. Everything here runs unchanged on SQLite and PostgreSQL:
case-insensitive search is `icontains` (ILIKE on PostgreSQL, `lower() LIKE lower()` on SQLite, whose
`lower` folds ASCII only) with LIKE wildcards escaped, and NULL progress sorts as the lowest value on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.sql.elements import UnaryExpression

from tuberunner.coordinator.database import Database
from tuberunner.coordinator.models import Job, Runner, iso
from tuberunner.coordinator.schema import jobs, registration_tokens, runners
from tuberunner.protocol.jobs import JobState, JobType

_JOB_SORT_COLUMNS: dict[str, Any] = {
    "updatedAt": jobs.c.updated_at,
    "createdAt": jobs.c.created_at,
    "priority": jobs.c.priority,
    "state": jobs.c.state,
    "progress": jobs.c.progress,
}
JOB_SORT_FIELDS = frozenset(_JOB_SORT_COLUMNS)


@dataclass(frozen=True)
class Page:
    start: int
    count: int


@dataclass(frozen=True)
class Sort:
    field: str
    descending: bool


@dataclass(frozen=True)
class JobFilter:
    """`uuid` (an exact job uuid) and `text` (substring of type or runner name) come from `search`;
    `states`/`types` None means no filter, an empty set matches nothing."""

    uuid: str | None = None
    text: str | None = None
    states: frozenset[JobState] | None = None
    types: frozenset[JobType] | None = None


@dataclass(frozen=True)
class RegistrationTokenRow:
    id: int
    token: str
    created_at: float
    updated_at: float
    registered_runners: int

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "registrationToken": self.token,
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
            "registeredRunnersCount": self.registered_runners,
        }


@dataclass(frozen=True)
class RunnerRow:
    """A runner as stored (its token never leaves the database through the admin API)."""

    id: int
    name: str
    description: str | None
    version: str | None
    ip: str | None
    last_contact: float
    created_at: float
    updated_at: float

    def with_contact(self, contact: tuple[float, str | None] | None) -> RunnerRow:
        """Merge a contact kept in memory (not flushed yet) when it is newer than the stored one."""
        if contact is None or contact[0] <= self.last_contact:
            return self
        at, ip = contact
        return RunnerRow(
            self.id,
            self.name,
            self.description,
            self.version,
            ip if ip is not None else self.ip,
            at,
            self.created_at,
            self.updated_at,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "ip": self.ip,
            "lastContact": iso(self.last_contact),
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
            "version": self.version,
        }


@dataclass(frozen=True)
class ParentRef:
    id: int
    uuid: str
    type: str
    state: JobState

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "uuid": self.uuid, "type": self.type, "state": self.state.as_json()}


@dataclass(frozen=True)
class AdminJob:
    """RunnerJobAdmin: the runner view plus `privatePayload` and `parent`; never the job token."""

    job: Job
    runner: Runner | None
    parent: ParentRef | None

    def as_json(self, base_url: str) -> dict[str, Any]:
        body = self.job.as_json(base_url, self.runner)
        body["privatePayload"] = self.job.private_payload
        if self.parent is not None:
            body["parent"] = self.parent.as_json()
        return body


def _order(column: Any, sort: Sort, *, nullable: bool = False) -> UnaryExpression[Any]:
    clause: UnaryExpression[Any] = column.desc() if sort.descending else column.asc()
    if nullable:
        # NULL is the lowest value: first ascending, last descending (SQLite's rule, made explicit
        # because PostgreSQL's default is the opposite).
        clause = clause.nulls_last() if sort.descending else clause.nulls_first()
    return clause


def _paged(stmt: Select[Any], page: Page) -> Select[Any]:
    return stmt.limit(page.count).offset(page.start)


# ---------------------------------------------------------------- registration tokens


async def list_registration_tokens(
    db: Database, page: Page, sort: Sort
) -> tuple[int, list[RegistrationTokenRow]]:
    registered = (
        select(func.count(runners.c.id))
        .where(runners.c.registration_token_id == registration_tokens.c.id)
        .correlate(registration_tokens)
        .scalar_subquery()
        .label("registered_runners")
    )
    stmt = select(registration_tokens, registered).order_by(
        _order(registration_tokens.c.created_at, sort), registration_tokens.c.id.asc()
    )
    async with db.read() as conn:
        total = (await conn.execute(select(func.count()).select_from(registration_tokens))).scalar_one()
        rows = (await conn.execute(_paged(stmt, page))).mappings().all()
    return int(total), [
        RegistrationTokenRow(
            id=r["id"],
            token=r["token"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            registered_runners=int(r["registered_runners"]),
        )
        for r in rows
    ]


# ---------------------------------------------------------------- runners

_RUNNER_COLUMNS = (
    runners.c.id,
    runners.c.name,
    runners.c.description,
    runners.c.version,
    runners.c.ip,
    runners.c.last_contact,
    runners.c.created_at,
    runners.c.updated_at,
)


async def list_runners(db: Database, page: Page, sort: Sort) -> tuple[int, list[RunnerRow]]:
    stmt = select(*_RUNNER_COLUMNS).order_by(_order(runners.c.created_at, sort), runners.c.id.asc())
    async with db.read() as conn:
        total = (await conn.execute(select(func.count()).select_from(runners))).scalar_one()
        rows = (await conn.execute(_paged(stmt, page))).mappings().all()
    return int(total), [RunnerRow(**{c.name: r[c.name] for c in _RUNNER_COLUMNS}) for r in rows]


# ---------------------------------------------------------------- jobs

_parent = jobs.alias("parent_job")
_JOB_EXTRAS = (
    runners.c.name.label("runner__name"),
    runners.c.description.label("runner__description"),
    _parent.c.uuid.label("parent__uuid"),
    _parent.c.type.label("parent__type"),
    _parent.c.state.label("parent__state"),
)


def _job_conditions(where: JobFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if where.uuid is not None:
        conditions.append(jobs.c.uuid == where.uuid)
    if where.text is not None:
        conditions.append(
            or_(
                jobs.c.type.icontains(where.text, autoescape=True),
                runners.c.name.icontains(where.text, autoescape=True),
            )
        )
    if where.states is not None:
        conditions.append(jobs.c.state.in_(sorted(int(s) for s in where.states)))
    if where.types is not None:
        conditions.append(jobs.c.type.in_(sorted(str(t) for t in where.types)))
    return conditions


async def list_jobs(db: Database, page: Page, sort: Sort, where: JobFilter) -> tuple[int, list[AdminJob]]:
    conditions = _job_conditions(where)
    with_runner = jobs.outerjoin(runners, runners.c.id == jobs.c.runner_id)
    # The count joins the runners only when the search needs their names.
    counted = with_runner if where.text is not None else jobs
    count_stmt = select(func.count()).select_from(counted).where(*conditions)
    page_stmt = (
        select(jobs, *_JOB_EXTRAS)
        .select_from(with_runner.outerjoin(_parent, _parent.c.id == jobs.c.parent_id))
        .where(*conditions)
        .order_by(
            _order(_JOB_SORT_COLUMNS[sort.field], sort, nullable=sort.field == "progress"),
            jobs.c.id.asc(),
        )
    )
    async with db.read() as conn:
        total = (await conn.execute(count_stmt)).scalar_one()
        rows = (await conn.execute(_paged(page_stmt, page))).mappings().all()
    found: list[AdminJob] = []
    for row in rows:
        job = Job.from_row(row)
        runner = (
            Runner(job.runner_id, row["runner__name"], row["runner__description"])
            if job.runner_id is not None and row["runner__name"] is not None
            else None
        )
        parent = (
            ParentRef(job.parent_id, row["parent__uuid"], row["parent__type"], JobState(row["parent__state"]))
            if job.parent_id is not None and row["parent__uuid"] is not None
            else None
        )
        found.append(AdminJob(job, runner, parent))
    return int(total), found
