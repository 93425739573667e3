#!/usr/bin/env python3
"""Instructions per request in each Sluice proxy of the benchmark's pair.

Runs the benchmark's backend and its two Sluice proxies (`bench
__proxy-node`, as `cargo xtask bench -- --only proxy-latency` does), the
proxies under callgrind, sends warm-up requests and then N requests over one
keep-alive connection (`oha -c 1`), and prints each proxy's instructions per
request, its top functions (exclusive) and its cost by crate.

    CARGO_PROFILE_DIST_DEBUG=line-tables-only CARGO_TARGET_DIR=/tmp/cg \\
        cargo build --profile dist -p benches --bin bench
    benches/profile/callgrind.py /tmp/cg/dist/bench [--requests 4000] [--top 30]

Needs valgrind and oha (`cargo xtask bench` installs oha). Counts, not
times: compare two builds with it, not two machines. callgrind_annotate's
flat view gives everything to `clone` for these multi-threaded dumps, so
the costs are summed from the dump's own records here.
"""
import argparse, collections, glob, os, re, shutil, subprocess, sys, tempfile, time


def run(bench, requests, out):
    procs = []

    def start(args, name=None):
        cmd = [bench, "__proxy-node"] + args
        if name:
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/{name}.%p"] + cmd
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(p)
        for line in p.stdout:
            if line.startswith("READY "):
                return p, line.split()[1]
        sys.exit(f"{' '.join(args)} exited before it was ready")

    try:
        ca = os.path.join(out, "ca")
        _, backend = start(["backend", "127.0.0.2:0"])
        server, server_addr = start(["sluice-server", backend, ca, "1"], "server")
        client, client_addr = start(["sluice-client", backend, server_addr, ca, "1"], "client")
        url = f"http://{client_addr}/"
        oha = lambda n: subprocess.run(["oha", "--no-tui", "-n", str(n), "-c", "1", url],
                                       check=True, capture_output=True, text=True).stdout
        oha(500)
        for p in (server, client):
            subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)
        answered = re.search(r"\[200\] (\d+) responses", oha(requests))
        if not answered or int(answered.group(1)) != requests:
            sys.exit(f"not every request was answered 200: {answered and answered.group(0)}")
        for p in (server, client):
            subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
        time.sleep(1)
    finally:
        for p in procs:
            p.kill()
    dumps = {}
    for name in ("client", "server"):
        files = sorted(f for f in glob.glob(f"{out}/{name}.*") if re.search(r"\.\d+\.\d+$", f))
        dumps[name] = files[-1]
    return dumps


def costs(path, callee=None):
    """Exclusive cost by function and by (function, source file); with
    `callee` (a regular expression), also the calls to matching functions
    by caller, {caller: [calls, inclusive cost]}, and by call site,
    {(caller, source file, line): [calls, inclusive cost]}."""
    names, files = {}, {}
    by_fn, by_file = collections.Counter(), collections.Counter()
    callers = collections.defaultdict(lambda: [0, 0])
    sites = collections.defaultdict(lambda: [0, 0])
    fn = fl = cur_file = cfn = None
    skip = False
    pos = 0  # the source line of the last cost line (positions may be relative)

    def position(token):
        nonlocal pos
        if token[0] in "+-":
            pos += int(token)
        elif token != "*":
            pos = int(token)

    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if skip:  # the inclusive cost of a call: not this function's own
            skip = False
            parts = line.split()
            if parts:
                position(parts[0])
            if callee and cfn and fn and len(parts) > 1 and re.search(callee, cfn):
                callers[fn][0] += calls
                callers[fn][1] += int(parts[1])
                site = sites[(fn, cur_file or "?", pos)]
                site[0] += calls
                site[1] += int(parts[1])
            continue
        m = re.match(r"(fl|fi|fe|cfi|cfl|fn|cfn)=\((\d+)\)(?: (.*))?", line)
        if m:
            kind, ident, text = m.groups()
            table = names if kind in ("fn", "cfn") else files
            if text:
                table[ident] = text
            if kind == "fl":
                fl = cur_file = files.get(ident)
            elif kind in ("fi", "fe"):
                cur_file = files.get(ident)
            elif kind == "fn":
                fn, cur_file = names.get(ident), fl
            elif kind == "cfn":
                cfn = names.get(ident)
            continue
        if line.startswith("calls="):
            skip = True
            calls = int(line[6:].split()[0])
            continue
        if line[:1] and (line[:1].isdigit() or line[:1] in "+-*"):
            parts = line.split()
            position(parts[0])
            if fn and len(parts) > 1:
                by_fn[fn] += int(parts[1])
                by_file[cur_file or "?"] += int(parts[1])
    return by_fn, by_file, callers, sites


def crate_of(path):
    m = re.search(r"/registry/src/[^/]+/([^/]+?)-\d[^/]*/", path)
    if m:
        return m.group(1)
    if "/rustc/" in path:
        return "std (inlined)"
    m = re.search(r"/(l7-proxy|certs|benches|mesh-agent)/src/(.*)", path)
    if m:
        return f"sluice {m.group(1)}/{m.group(2)}"
    return os.path.basename(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", help="the bench binary, built with line tables (see above)")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--callers", metavar="REGEX",
                    help="also list the callers of the functions matching REGEX "
                    "(calls and inclusive instructions per request)")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="sluice-callgrind-")
    try:
        dumps = run(args.bench, args.requests, out)
        n = args.requests
        for name in ("client", "server"):
            by_fn, by_file, callers, sites = costs(dumps[name], args.callers)
            total = sum(by_fn.values())
            print(f"== {name}-side proxy: {total / n:,.0f} instructions per request")
            for f, c in by_fn.most_common(args.top):
                print(f"{c / n:9,.0f}  {f[:110]}")
            crates = collections.Counter()
            for f, c in by_file.items():
                crates[crate_of(f)] += c
            print("  by crate (source file of the instructions, inlined code counted where it came from):")
            for k, c in crates.most_common(args.top):
                print(f"{c / n:9,.0f}  {k}")
            if args.callers:
                print(f"  callers of /{args.callers}/ (calls per request, inclusive instructions per request):")
                ranked = sorted(callers.items(), key=lambda kv: -kv[1][1])
                for f, (calls, cost) in ranked[: args.top]:
                    print(f"{calls / n:6.2f} {cost / n:9,.0f}  {f[:110]}")
                print("  ... by call site (the line calling, in the caller or in code inlined into it):")
                ranked = sorted(sites.items(), key=lambda kv: -kv[1][1])
                for (f, file, line), (calls, cost) in ranked[: args.top]:
                    where = re.sub(r".*/(registry/src/[^/]+/|rustc/[^/]+/library/|work/main/)", "", file)
                    print(f"{calls / n:6.2f} {cost / n:9,.0f}  {where}:{line}  ({f[:60]})")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
