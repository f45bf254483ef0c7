"""How the review queue holds up as cases pile up, and what a picture costs.

Starts a throwaway PostgreSQL, migrates it, and fills it with N open review cases (images,
sources, detections, verdicts and filter signals, inserted in bulk), for each N given.
Then times, as the dashboard calls them (``workers.review``):

- ``queue``: page 1 of the default queue (counts, filter values, 25 rows in priority order)
- ``queue, filtered``: page 1 with a detector filter and a minimum score
- ``queue, page 200``: a deep page (OFFSET)
- ``next + release``: claim the next case and give it back (two transactions each)
- ``case page``: everything the case page shows

and, once, a picture: the thumbnail and display render of a 4000x3000 JPEG, cold (fetch,
decode within the intake limits, resize, encode) and from the disk cache.

    .venv/bin/python benchmarks/bench_review.py [--cases 1000 10000 100000] [--repeat 20]

Prints the median and p95 of each step per N, side by side, and the ratio to the smallest N.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # server starters

import servers  # noqa: E402

DETECTORS = ("sumsub-mj5", "sumsub-sdxl", "community-forensics", "provenance")


def fill(url: str, cases: int) -> None:
    """``cases`` flagged images with an open case each, written with plain bulk inserts."""
    import sqlalchemy as sa

    from db.models import utcnow

    engine = sa.create_engine(url)
    now = utcnow()
    with engine.begin() as connection:
        ensemble = connection.execute(
            sa.text(
                "INSERT INTO ensembles (version, digest, definition, created_at) VALUES "
                "('weighted-mean@bench', :digest, '{\"threshold\": 0.5}', :now) RETURNING id"
            ),
            {"digest": "b" * 64, "now": now},
        ).scalar_one()
        batch = 5000
        for start in range(0, cases, batch):
            count = min(batch, cases - start)
            rows = range(start, start + count)
            sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in rows]
            image_ids = (
                connection.execute(
                    sa.text(
                        "INSERT INTO images (sha256, size_bytes, format, first_seen_at) "
                        "SELECT s, 1000, 'JPEG', :now FROM unnest(CAST(:sha AS text[])) AS s "
                        "RETURNING id"
                    ),
                    {"sha": sha, "now": now},
                )
                .scalars()
                .all()
            )
            connection.execute(
                sa.text(
                    "INSERT INTO sources (kind, ref_key, bucket, object_key, image_id, status, "
                    "created_at, last_seen_at, seen_count, resend_count) SELECT 'hook', "
                    "'media/' || i, 'media', 'up/' || i, i, 'scored', :now, :now, 1, 0 "
                    "FROM unnest(CAST(:ids AS bigint[])) AS i"
                ),
                {"ids": image_ids, "now": now},
            )
            for d, name in enumerate(DETECTORS):
                connection.execute(
                    sa.text(
                        "INSERT INTO detections (image_id, detector_name, detector_version, "
                        "score, evidence, created_at) SELECT i, :name, '1', "
                        "((i * 7919 + :d) % 1000) / 1000.0, '{}', :now "
                        "FROM unnest(CAST(:ids AS bigint[])) AS i"
                    ),
                    {"ids": image_ids, "name": name, "d": d, "now": now},
                )
            verdict_ids = connection.execute(
                sa.text(
                    "INSERT INTO verdicts (image_id, ensemble_version, ensemble_id, "
                    "detector_set_digest, detector_set, ai_score, label, flagged, reason, "
                    "created_at) SELECT i, 'weighted-mean@bench', :ensemble, md5(i::text), "
                    "'{}', 0.5 + ((i * 31) % 500) / 1000.0, 'likely_ai', true, 'bench', :now "
                    "FROM unnest(CAST(:ids AS bigint[])) AS i RETURNING id, image_id, ai_score"
                ),
                {"ids": image_ids, "ensemble": ensemble, "now": now},
            ).all()
            case_ids = (
                connection.execute(
                    sa.text(
                        "INSERT INTO review_cases (verdict_id, image_id, state, opened_at, score, "
                        "queue_key, reviews_required) SELECT v, i, 'open', "
                        ":now - (i % 1440) * interval '1 minute', s, "
                        ":now - (i % 1440) * interval '1 minute' - s * interval '24 hours', 1 "
                        "FROM unnest(CAST(:vs AS bigint[]), CAST(:is AS bigint[]), "
                        "CAST(:ss AS float8[])) AS t(v, i, s) RETURNING id"
                    ),
                    {
                        "vs": [v.id for v in verdict_ids],
                        "is": [v.image_id for v in verdict_ids],
                        "ss": [v.ai_score for v in verdict_ids],
                        "now": now,
                    },
                )
                .scalars()
                .all()
            )
            connection.execute(
                sa.text(
                    "INSERT INTO review_case_signals (case_id, kind, value) "
                    "SELECT c, 'detector', (CAST(:names AS text[]))[1 + c % 3] "
                    "FROM unnest(CAST(:ids AS bigint[])) AS c "
                    "UNION ALL SELECT c, 'source', 'hook' FROM unnest(CAST(:ids AS bigint[])) AS c "
                    "UNION ALL SELECT c, 'provenance', 'c2pa' "
                    "FROM unnest(CAST(:ids AS bigint[])) AS c WHERE c % 10 = 0"
                ),
                {"ids": case_ids, "names": list(DETECTORS[:3])},
            )
        connection.execute(sa.text("ANALYZE"))
    engine.dispose()


def spread(times: list[float]) -> str:
    """``median (p95)`` of ``times``."""
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    median = statistics.median(ordered)
    digits = 1 if median >= 1 else 3
    return f"{median:.{digits}f} ({p95:.{digits}f})"


def timed(step: Callable[[], object], repeat: int) -> list[float]:
    step()  # warm: connections, caches
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    return times


def measure_queue(url: str, repeat: int) -> dict[str, list[float]]:
    from db.repository import QueueFilter
    from db.session import make_engine, make_sessionmaker
    from workers import review

    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    policy = review.ReviewPolicy(active_ensemble="weighted-mean@bench")
    moderator = review.Reviewer("token:bench")

    def next_and_release() -> None:
        claim = review.claim_next(sessions, moderator, policy)
        assert claim is not None
        review.release(sessions, claim.case_id, moderator)

    first = review.queue(sessions, QueueFilter(), page=1, per_page=1).rows[0].case_id
    results = {
        "queue": timed(lambda: review.queue(sessions, QueueFilter(), page=1, per_page=25), repeat),
        "queue, filtered": timed(
            lambda: review.queue(
                sessions, QueueFilter(detector="sumsub-sdxl", min_score=0.9), page=1, per_page=25
            ),
            repeat,
        ),
        "queue, page 200": timed(
            lambda: review.queue(sessions, QueueFilter(), page=200, per_page=25), repeat
        ),
        "next + release": timed(next_and_release, repeat),
        "case page": timed(lambda: review.case_view(sessions, first, moderator, policy), repeat),
    }
    engine.dispose()
    return results


def measure_pictures(repeat: int) -> dict[str, list[float]]:
    """One 4000x3000 JPEG scanned from a local file: its thumbnail and display render,
    cold (a fresh cache each time) and warm."""
    from PIL import Image

    from db import repository
    from db.migrate import upgrade
    from db.models import SourceKind
    from db.session import make_engine, make_sessionmaker, transaction
    from synthsentry.settings import Settings
    from workers.intake import IntakeLimits
    from workers.review_media import MediaCache, ReviewMedia

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        picture = Image.radial_gradient("L").resize((4000, 3000)).convert("RGB")
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=90)
        data = out.getvalue()
        path = root / "big.jpg"
        path.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        url = f"sqlite:///{root / 'media.db'}"
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        with transaction(sessions) as session:
            image = repository.get_or_create_image(
                session, repository.ImageFacts(sha256=sha, size_bytes=len(data), format="JPEG")
            )
            ref = repository.SourceRef(SourceKind.CLI, f"{path}@{sha}", local_path=str(path))
            repository.record_source(session, ref, image.id)
            image_id = image.id
        defaults = Settings(data_dir=root)  # the intake limits a deployment starts with
        limits = IntakeLimits(
            max_bytes=defaults.max_image_bytes,
            max_pixels=defaults.max_image_pixels,
            decode_timeout_s=defaults.decode_timeout_seconds,
        )
        counter = iter(range(10**9))

        def cold(kind: str) -> Callable[[], object]:
            def render() -> object:
                cache = MediaCache(root / f"cache-{next(counter)}", 64 * 1024 * 1024)
                media = ReviewMedia(sessions, None, limits, cache)
                return getattr(media, kind)(image_id, sha)

            return render

        warm = ReviewMedia(sessions, None, limits, MediaCache(root / "warm", 64 * 1024 * 1024))
        results = {
            "thumbnail, cold": timed(cold("thumbnail"), repeat),
            "thumbnail, cached": timed(lambda: warm.thumbnail(image_id, sha), repeat),
            "display, cold": timed(cold("display"), repeat),
            "display, cached": timed(lambda: warm.display(image_id, sha), repeat),
        }
        engine.dispose()
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    from db.migrate import upgrade

    by_size: dict[int, dict[str, list[float]]] = {}
    with servers.start_postgres() as postgres:
        for n in args.cases:
            url = servers.recreate_database(postgres.url, f"bench_review_{n}")
            upgrade(url)
            started = time.perf_counter()
            fill(url, n)
            print(f"{n} cases filled in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            by_size[n] = measure_queue(url, args.repeat)
            servers.drop_database(postgres.url, f"bench_review_{n}")

    sizes = list(by_size)
    print(f"\nreview service on PostgreSQL, median (p95) in ms over {args.repeat} runs")
    header = f"{'step':<18}" + "".join(f"{f'{n:,} cases':>22}" for n in sizes)
    print(header + f"{'ratio last/first':>18}")
    for step in by_size[sizes[0]]:
        cells = [spread(by_size[n][step]) for n in sizes]
        ratio = statistics.median(by_size[sizes[-1]][step]) / statistics.median(
            by_size[sizes[0]][step]
        )
        print(f"{step:<18}" + "".join(f"{c:>22}" for c in cells) + f"{ratio:>17.1f}x")

    pictures = measure_pictures(max(3, args.repeat // 4))
    print("\npictures of one 4000x3000 JPEG, median (p95) in ms")
    for step, times in pictures.items():
        print(f"{step:<18}{spread(times):>18}")
    cold = statistics.median(pictures["thumbnail, cold"])
    warm = statistics.median(pictures["thumbnail, cached"])
    print(f"thumbnail cold/cached: {cold / warm:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
