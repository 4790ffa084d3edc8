"""The service's import graph: no cycles (imports inside functions counted too), and the light modules stay light."""

from __future__ import annotations

import subprocess
import sys

import grimp

SERVICE_BENCH = ("refstream.bench.service", "refstream.bench.pruning", "refstream.bench.metrics")


def test_no_import_cycles_in_the_service_and_its_benchmarks():
    graph = grimp.build_graph("refstream", include_external_packages=False)
    modules = sorted(m for m in graph.modules if m.startswith("refstream.service.") or m in SERVICE_BENCH)
    cycles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("refstream.") and graph.chain_exists(importer=imported, imported=module):
                cycles.append([module, *graph.find_shortest_chain(importer=imported, imported=module)])
    assert cycles == [], f"import cycles: {cycles}"
    assert "refstream.service.metrics" in modules and "refstream.bench.service" in modules


def test_heartbeat_and_results_are_leaves_and_the_client_does_not_load_torch():
    graph = grimp.build_graph("refstream", include_external_packages=False)
    assert graph.find_modules_directly_imported_by("refstream.service.heartbeat") == set()
    # results reads the list of job files from refstream.outputs (which loads no torch either)
    assert graph.find_modules_directly_imported_by("refstream.service.results") == {"refstream.outputs"}
    # the client verbs (submit, status, result) load neither torch nor Ray nor the workers
    code = ("import sys, refstream.service.client; "
            "print(sorted(m for m in ('torch', 'ray', 'refstream.service.worker') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
