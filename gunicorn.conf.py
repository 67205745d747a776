# An example gunicorn configuration for an app served by edgesync.
#
# gunicorn reads ./gunicorn.conf.py from the directory it is started in, so every
# setting here is commented out: the README's commands, run from this directory,
# behave exactly as written. Copy this file next to your app and uncomment what
# you need (command-line flags still win over it).
#
# edgesync's own settings (limits, policy, background threads) are not gunicorn
# settings: they live in the [edge_runtime] table of edgesync.toml, or in
# EDGESYNC_<KEY> environment variables. See README.md, "Configuration".

# The worker class; "egg:edgesync-wsgi#edgesync" names the same class.
# worker_class = "edgesync.Worker"

# At least 2: a retiring worker keeps accepting until its replacement serves, but
# a stop or a hard limit does not wait for one (README, "Recycling without losing
# capacity").
# workers = 2

# Request threads per worker. Background tasks have their own threads
# (background_threads in edgesync.toml).
# threads = 4

# How long a stopping or retiring worker may drain its requests and background
# tasks; tasks still running then are abandoned (and logged). Keep it above your
# longest task.
# graceful_timeout = 30

# Recycle each worker after about this many requests: it retires like at any soft
# limit (finishes its work, then beforeunload with reason "early_drop"). The
# jitter keeps workers started together from retiring together.
# max_requests = 1000
# max_requests_jitter = 100

# For threaded workers this is only a heartbeat; edgesync keeps it going while it
# drains, and enforces its own CPU / wall-clock / memory limits.
# timeout = 30

# Send edgesync's counters and gauges (edgesync.tasks.*, edgesync.retirements.*,
# edgesync.beforeunload.*, ...) through gunicorn's statsd logger, with its prefix.
# statsd_host = "127.0.0.1:8125"
# statsd_prefix = "myapp"

# bind = "127.0.0.1:8000"
