"""Checks weir's OpenLineage events against the OpenLineage Python client's
model (openlineage-python, generated from the OpenLineage JSON schemas):
every event read from stdin is rebuilt from the client's classes, whose
validators check run ids, times and URLs, and serialized again; the result
must equal what weir wrote, facets' schema URLs included. Exit 1 on the
first difference, naming it."""

import json
import sys

from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.generated.column_lineage_dataset import (
    ColumnLineageDatasetFacet,
    Fields,
    InputField,
    Transformation,
)
from openlineage.client.generated.schema_dataset import SchemaDatasetFacet, SchemaDatasetFacetFields
from openlineage.client.generated.sql_job import SQLJobFacet
from openlineage.client.serde import Serde


def input_field(f):
    return InputField(
        namespace=f["namespace"],
        name=f["name"],
        field=f["field"],
        transformations=[Transformation(type=t["type"], subtype=t.get("subtype")) for t in f["transformations"]],
    )


def rebuild(e):
    producer = e["producer"]
    out = e["outputs"][0]
    schema = out["facets"]["schema"]
    lineage = out["facets"]["columnLineage"]
    facets = {
        "schema": SchemaDatasetFacet(
            fields=[
                SchemaDatasetFacetFields(name=f["name"], type=f.get("type"), description=f.get("description"))
                for f in schema["fields"]
            ],
            producer=producer,
        ),
        "columnLineage": ColumnLineageDatasetFacet(
            fields={
                name: Fields(inputFields=[input_field(f) for f in v["inputFields"]])
                for name, v in lineage["fields"].items()
            },
            dataset=[input_field(f) for f in lineage.get("dataset", [])],
            producer=producer,
        ),
    }
    return RunEvent(
        eventType=RunState(e["eventType"]),
        eventTime=e["eventTime"],
        run=Run(runId=e["run"]["runId"]),
        job=Job(
            namespace=e["job"]["namespace"],
            name=e["job"]["name"],
            facets={"sql": SQLJobFacet(query=e["job"]["facets"]["sql"]["query"], producer=producer)},
        ),
        inputs=[InputDataset(namespace=i["namespace"], name=i["name"]) for i in e["inputs"]],
        outputs=[OutputDataset(namespace=out["namespace"], name=out["name"], facets=facets)],
        producer=producer,
    )


def prune(v):
    """Drops empty lists and objects: the client writes them, weir leaves them out."""
    if isinstance(v, dict):
        return {k: prune(x) for k, x in v.items() if x not in ({}, [], None)}
    if isinstance(v, list):
        return [prune(x) for x in v]
    return v


def main():
    events = json.load(sys.stdin)
    if not events:
        print("no events", file=sys.stderr)
        return 1
    for e in events:
        again = prune(json.loads(Serde.to_json(rebuild(e))))
        if again != prune(e):
            print("event for", e["job"]["name"], "differs from the client's model:", file=sys.stderr)
            print("weir:  ", json.dumps(e, sort_keys=True), file=sys.stderr)
            print("model: ", json.dumps(again, sort_keys=True), file=sys.stderr)
            return 1
    print(f"{len(events)} events match the OpenLineage model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
