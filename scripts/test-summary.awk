# One summary over a whole `cargo test --no-fail-fast` log (stdout and stderr
# together), counting every test binary: how many ran, which failed, and the
# totals of the tests in them. Used by scripts/test.sh; by hand:
#
#   awk -f scripts/test-summary.awk cargo-test.log
#
# What it reads from cargo's output:
#   "     Running tests/x.rs (target/debug/deps/x-HASH)"  a test binary starts
#   "     Running `target/debug/deps/x-HASH`"              the same, with -v
#   "   Doc-tests crate"                                   a crate's doc tests start
#   "test result: ok. 3 passed; 1 failed; 2 ignored; ..."  the binary's totals
#   "error: test failed, to rerun pass `-p c --test x`"    the binary failed
#   "error: N target(s) failed:" and the lines "    `-p c --test x`" after it
#   "error: could not compile ..."                         a build failure
# A binary with no "test result:" line died before the end (a crash, a signal, a
# `process::exit`): it counts as failed.
# Exit status: 0 when every binary passed and nothing failed to build, else 1.

function finish() {
    if (cur == "") return
    if (!(cur in result)) {
        failed_bins[cur] = 1
        why[cur] = "no test result: it died before the end"
    }
    cur = ""
}

function open_bin(name) {
    finish()
    nbins++
    # Two binaries may share a name (tests/config.rs in two crates): number them.
    if (name in seen) { seen[name]++; name = name " #" seen[name] } else { seen[name] = 1 }
    cur = name
    order[nbins] = name
}

function bin_name(s,    base) {
    # "unittests src/lib.rs (target/debug/deps/epu_core-0a1b2c)" -> "epu_core (unittests src/lib.rs)"
    # "tests/config.rs (target/debug/deps/config-0a1b2c)"         -> "config (tests/config.rs)"
    # "`/abs/target/debug/deps/config-0a1b2c`" (-v)               -> "config"
    if (match(s, /\(.*\)$/)) {
        base = substr(s, RSTART + 1, RLENGTH - 2)
        sub(/^.*\//, "", base)
        sub(/-[0-9a-f]+(\.exe)?$/, "", base)
        return base " (" substr(s, 1, RSTART - 2) ")"
    }
    gsub(/`/, "", s)
    sub(/ .*$/, "", s)
    sub(/^.*\//, "", s)
    sub(/-[0-9a-f]+(\.exe)?$/, "", s)
    return s
}

{
    line = $0
    gsub(/\033\[[0-9;]*[A-Za-z]/, "", line)
    gsub(/\r/, "", line)
}

in_block && line ~ /^    `.*`$/ {
    t = line
    sub(/^    /, "", t)
    cargo_failed_list = cargo_failed_list "\n    " t
    next
}
{ in_block = 0 }

line ~ /^ +Running / {
    rest = line
    sub(/^ +Running +/, "", rest)
    # With -v cargo also shows the compiler's command lines: not test binaries.
    if (rest ~ /^`/ && rest ~ /--crate-name|\/build\/.*build-script/) next
    open_bin(bin_name(rest))
    next
}

line ~ /^ +Doc-tests / {
    rest = line
    sub(/^ +Doc-tests +/, "", rest)
    open_bin(rest " (doc-tests)")
    next
}

line ~ /^test result: / {
    p = f = ig = 0
    n = split(line, w, /[ ;.]+/)
    for (i = 2; i <= n; i++) {
        if (w[i] == "passed") p = w[i - 1]
        else if (w[i] == "failed") f = w[i - 1]
        else if (w[i] == "ignored") ig = w[i - 1]
    }
    passed += p; failed += f; ignored += ig
    if (cur == "") open_bin("(unnamed binary)")
    result[cur] = line
    if (line ~ /^test result: FAILED/ || f > 0) {
        failed_bins[cur] = 1
        why[cur] = f " failed"
    }
    next
}

line ~ /^error: test failed, to rerun pass `/ {
    args = line
    sub(/^error: test failed, to rerun pass /, "", args)
    gsub(/`/, "", args)
    # This comes right after the binary that failed.
    target = cur
    if (target == "" && nbins > 0) target = order[nbins]
    if (target != "") {
        failed_bins[target] = 1
        rerun[target] = args
        if (!(target in why)) why[target] = "failed"
    }
    next
}

line ~ /^error: [0-9]+ targets? failed:$/ {
    finish()
    split(line, w, / /)
    cargo_failed = w[2]
    in_block = 1
    next
}

line ~ /^error: could not compile / {
    build_errors = build_errors "\n    " line
    nbuild++
    next
}

END {
    finish()
    nfailed = 0
    for (i = 1; i <= nbins; i++) if (order[i] in failed_bins) nfailed++
    printf "\nsummary: %d test binaries ran, %d failed; tests: %d passed, %d failed, %d ignored\n",
        nbins, nfailed, passed, failed, ignored
    if (nfailed > 0) {
        print "failed test binaries:"
        for (i = 1; i <= nbins; i++) {
            b = order[i]
            if (!(b in failed_bins)) continue
            printf "    %s: %s", b, why[b]
            if (b in rerun) printf " (rerun: cargo test %s)", rerun[b]
            printf "\n"
        }
    }
    if (cargo_failed != "") {
        printf "cargo: %d target%s failed:%s\n", cargo_failed, cargo_failed == 1 ? "" : "s", cargo_failed_list
        if (cargo_failed + 0 != nfailed)
            printf "note: cargo counts %d failed targets, this summary %d: see the log\n", cargo_failed, nfailed
    }
    if (nbuild > 0) printf "build failures (their tests did not run):%s\n", build_errors
    exit (nfailed > 0 || failed > 0 || cargo_failed > 0 || nbuild > 0) ? 1 : 0
}
