"""Teacher serving, the server side: `opd-fast serve-teacher` answers score requests with
exact top-k payloads (docs/math.md, Teacher payload) instead of (T, V) logits.
User guide: docs/serving.md.

`scorer` validates requests (frames of opd_fast.wire) and scores batches with the model,
`server` is the HTTP server with its request batching.

    opd-fast serve-teacher --model DIR [--host 127.0.0.1] [--port 8000] [--token SECRET]
    opd-fast train --set teacher_url=http://127.0.0.1:8000 --set teacher_token=SECRET ...

Imports: opd_fast.wire, opd_fast.op, opd_fast.models, opd_fast.toy (the "toy" model).
"""
