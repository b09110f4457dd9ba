"""The sipwire ops console: a FastAPI app with live pages, a REST admin API and an OTLP receiver.

The console is its own process. It never touches a SIP connection: it reads
the transport through one data source (:mod:`console.source`) and changes it
(resize, close) only through the transport's control socket.

Modules, one responsibility each:
    app      -- the application factory: wires settings, data source, auth, routes and assets
    assets   -- where templates and the npm-installed htmx live, found once at start
    auth     -- the admin token, the login cookie and CSRF checks
    source   -- the one way the console reads the transport (control socket, stats block)
    history  -- a background sampler: recent figures for sparklines and rates
    models   -- Pydantic models of every REST body
    render   -- Jinja2 pages and their named blocks (htmx partials)
    api      -- the REST API (JSON to clients, HTML partials to htmx)
    pages    -- full HTML pages and the login form
    metrics  -- Prometheus text exposition
    otlp     -- the OTLP/HTTP trace receiver and the trace API
    otlpdecode -- OTLP trace exports (protobuf, JSON) to spans
    tracestore -- spans assembled into traces; bounded in spans, tail-policy eviction, retention of listed traces
    serve    -- running the app under uvicorn (``sipwire console``)
"""
