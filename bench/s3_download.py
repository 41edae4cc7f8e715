"""A 200 MB result downloaded into the bucket in `s3` mode vs a bare streamed copy into the same S3 server.

    .venv/bin/python bench/s3_download.py [--megabytes 200] [--rounds 5]

A small static server (its own process, `sendfile`) stands for Upsampler's CDN and serves one
file of random bytes on a loopback port, as in bench/download_200mb.py; the S3 server is
devstack.S3Server (SeaweedFS `weed mini` on loopback, every signature checked), as the tests use.

Contenders, each in a fresh subprocess so that its peak RSS (VmHWM) is its own, the growth being
the peak minus the peak after imports, client set-up and one warm-up request to the CDN and one
to the store (the code of the two references is bench/s3_choice.py's):

- ours: `StorageActivities.download_result` (activities/storage.py) with Settings in s3 mode
  (storage_url s3://..., the S3Server's settings) and a result fetch policy allowing the CDN's
  loopback host, called through temporalio.testing.ActivityEnvironment (no worker), so heartbeats
  work: the fetch guard, 8 MiB parts into a multipart upload, one in flight while the next is
  read, SHA-256 of every byte, a heartbeat per finished part (bytes stored, upload id, ETags).
- bare-put, the baseline of the target: httpx streams the CDN's body straight into one presigned
  PUT (no SDK, no parts, no hash).
- botocore-multipart: the same multipart calls as ours from plain botocore in asyncio.to_thread,
  without our code (no guard, hash or heartbeats): what our code costs over the calls themselves.

The rounds alternate (bare-put, botocore-multipart, ours, ...); medians are compared. After every
run the object in the bucket is read back whole and its SHA-256 checked against the source's
(ours also returns the digest it computed while streaming: checked too). Targets: ours >= 0.8 of
bare-put's throughput, peak RSS growth <= 64 MiB.

Figures, 2026-12-01, 2 cores shared with other load:
    .venv/bin/python bench/s3_download.py --megabytes 200 --rounds 5
    test file: 200 MB of random bytes; medians of 5 alternating rounds
                                                            MB/s x bare-put  RSS growth  CPU s
      bare httpx stream -> one presigned PUT (baseline)     55.6       1.00     0.8 MiB   0.73
      botocore multipart calls alone, in threads            32.9       0.59    39.2 MiB   0.89
      ours: download_result, s3 mode                        38.7       0.70    46.0 MiB   0.95
    throughput ratio ours / bare-put: 0.70   (target >= 0.8)   MISS
    ours peak RSS growth: 46.0 MiB   (target <= 64 MiB)   PASS
    heartbeats per download: 24 (one per 8 MiB part); every stored object's SHA-256 equal to the source's
The load was heavy (load average 3.4 to 6.6 on the 2 cores: other sessions' test suites, each
with its own weed and Temporal): single rounds ranged 47-67 MB/s for bare-put, 27-51 for ours.
Five more runs that hour with --rounds 3 gave ours / bare-put 0.67 and 0.61, and 1.10, 0.95,
0.59 with botocore's default CRC32 checksums off (AWS_REQUEST_CHECKSUM_CALCULATION=when_required):
the noise is larger than that setting's effect. Ours / botocore-multipart was 0.88 to 0.94 in
those five: what our code adds (fetch guard, SHA-256, heartbeats, the part copies) costs about a
tenth; the rest of the gap is the multipart upload itself (one 8 MiB part in flight, each a
request weed finishes before the next is sent) against one continuous PUT. Peak RSS growth
stays about 7 MiB above botocore's calls alone.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, verdict, wait_for_port  # noqa: E402
from s3_choice import BARE_PUT, BOTOCORE_UPLOAD, CDN, PART, make_file, run  # noqa: E402

TARGET_RATIO = 0.8
TARGET_GROWTH_MIB = 64

# After s3_choice.COMMON (C: the run's config as JSON; Clock, hwm, report).
OURS = """
from pathlib import Path
from temporalio.testing import ActivityEnvironment
from activities.storage import StorageActivities
from smi.settings import Settings
from smi.vocabulary import DownloadRequest

host = C["cdn"].split("/")[2]
settings = Settings(env="dev", storage_dir=Path(C["folder"]), fetch_allow_hosts=host, upsampler_result_hosts=host,
                    **C["settings"])
storage = StorageActivities(settings)
env = ActivityEnvironment()
beats = []
env.on_heartbeat = lambda *details: beats.append(details)

async def main():
    await asyncio.to_thread(storage.storage.exists, "warm-up")
    await storage.http.head(C["cdn"])
    with Clock() as clock:
        done = await env.run(storage.download_result, DownloadRequest(C["job_id"], C["cdn"], 1))
    report(seconds=clock.seconds, cpu=clock.cpu, bytes=done.bytes, sha256=done.sha256, location=done.path,
           peak_kib=hwm(), base_kib=clock.base, heartbeats=len(beats))
asyncio.run(main())
"""

CONTENDERS = {  # name: (label, code after s3_choice.COMMON)
    "bare-put": ("bare httpx stream -> one presigned PUT (baseline)", BARE_PUT),
    "botocore-multipart": ("botocore multipart calls alone, in threads", BOTOCORE_UPLOAD),
    "ours": ("ours: download_result, s3 mode", OURS),
}


def stored_sha256(server, key: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    for chunk in server.client.get_object(Bucket=server.bucket, Key=key)["Body"].iter_chunks(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def one_run(name: str, server, cdn_url: str, tmp: Path, round_: int) -> dict:
    """One contender's download into the bucket; the object read back and checked, then deleted."""
    job_id = uuid.uuid4().hex
    prefix = f"bench-{round_}"
    key = f"{prefix}/jobs/{job_id}/tmp/result-1" if name == "ours" else f"{prefix}/{name}"
    config = {
        "endpoint": server.endpoint, "region": server.storage_settings["s3_region"], "bucket": server.bucket,
        "access_key": server.storage_settings["s3_access_key_id"], "part": PART, "cdn": cdn_url, "key": key,
        "secret_key": server.storage_settings["s3_secret_access_key"], "folder": str(tmp / "scratch"),
        "job_id": job_id, "settings": {**server.storage_settings, "storage_url": f"s3://{server.bucket}/{prefix}"},
        "put_url": server.client.generate_presigned_url(
            "put_object", Params={"Bucket": server.bucket, "Key": key}, ExpiresIn=600
        ),
    }  # fmt: skip
    one = run(CONTENDERS[name][1], config, tmp / "scratch")
    one["stored"] = stored_sha256(server, key)
    server.client.delete_object(Bucket=server.bucket, Key=key)
    if name == "ours" and one["location"] != f"s3://{server.bucket}/{key}":
        raise RuntimeError(f"ours stored at {one['location']}, not {key}")
    return one


def main(args: argparse.Namespace) -> dict:
    from devstack import S3Server, free_ports

    began = time.perf_counter()
    size = args.megabytes * 1_000_000
    with tempfile.TemporaryDirectory(prefix="smi-bench-s3-download-") as folder:
        tmp = Path(folder)
        served = tmp / "served"
        served.mkdir()
        made = time.perf_counter()
        expected = make_file(served / "result.png", args.megabytes)
        print(f"test file: {args.megabytes} MB of random bytes (made in {time.perf_counter() - made:.1f} s)")
        port = free_ports(1)[0]
        cdn = subprocess.Popen([sys.executable, "-c", CDN, str(served), str(port)], cwd=ROOT)
        server = None
        try:
            wait_for_port(port, process=cdn)
            server = S3Server(tmp / "s3")
            cdn_url = f"http://127.0.0.1:{port}/result.png"
            print(f"CDN {cdn_url}, S3 server (weed mini) {server.endpoint}, bucket {server.bucket}")
            results: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
            for r in range(args.rounds):
                line = [f"round {r + 1}:"]
                for name in CONTENDERS:
                    one = one_run(name, server, cdn_url, tmp, r)
                    if one["stored"] != (size, expected) or one.get("sha256") not in (None, expected):
                        raise RuntimeError(f"{name}: wrong bytes stored: {one}")
                    results[name].append(one)
                    growth = (one["peak_kib"] - one["base_kib"]) / 1024
                    line.append(f"{name} {size / 1e6 / one['seconds']:6.1f} MB/s +{growth:5.1f} MiB")
                print("  ".join(line), flush=True)
        finally:
            cdn.terminate()
            cdn.wait(timeout=10)
            if server is not None:
                server.stop()
    return report(args, results, time.perf_counter() - began)


def report(args: argparse.Namespace, results: dict[str, list[dict]], seconds: float) -> dict:
    size = args.megabytes * 1_000_000
    speed = {n: statistics.median(size / 1e6 / one["seconds"] for one in runs) for n, runs in results.items()}
    growth = {n: max((one["peak_kib"] - one["base_kib"]) / 1024 for one in runs) for n, runs in results.items()}
    cpu = {n: statistics.median(one["cpu"] for one in runs) for n, runs in results.items()}
    beats = [one["heartbeats"] for one in results["ours"]]
    print(
        f"\n{args.megabytes} MB from the loopback CDN into weed mini, {args.rounds} alternating rounds, medians; "
        "RSS growth: the process's peak minus its peak after set-up (largest round); every stored object "
        f"read back, its SHA-256 equal to the source's; heartbeats per download (ours): {beats}"
    )
    print(f"  {'':50s} {'MB/s':>7s} {'x bare-put':>10s} {'RSS growth':>11s} {'CPU s':>6s}")
    for n, (label, _) in CONTENDERS.items():
        print(f"  {label:50s} {speed[n]:7.1f} {speed[n] / speed['bare-put']:10.2f} {growth[n]:7.1f} MiB {cpu[n]:6.2f}")
    ratio = speed["ours"] / speed["bare-put"]
    print(
        f"throughput ratio ours / bare-put: {ratio:.2f}   (target >= {TARGET_RATIO})   {verdict(ratio >= TARGET_RATIO)}"
    )
    print(
        f"ours peak RSS growth: {growth['ours']:.1f} MiB   (target <= {TARGET_GROWTH_MIB} MiB)   "
        f"{verdict(growth['ours'] <= TARGET_GROWTH_MIB)}"
    )
    print(f"run time {seconds:.0f} s")
    return {"ratio": ratio, "growth": growth["ours"], "speed": speed}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=200, help="size of the result in MB (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    main(parser.parse_args())
