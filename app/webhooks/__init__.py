"""Signed webhooks (Standard Webhooks, https://www.standardwebhooks.com) for jobs that end.

- :mod:`app.webhooks.guard`: which URLs may be called (SSRF rules, allow-list) and the address to connect to.
- :mod:`app.webhooks.signing`: ``whsec_`` secrets and the ``webhook-*`` headers.
- :mod:`app.webhooks.tenants`: each tenant's signing secret (rotation) and default URL.
- :mod:`app.webhooks.delivery`: one delivery attempt (claim, POST, record, when to retry) and the sweep.

No TensorFlow and no Celery worker code here: the API validates URLs and publishes the first attempt of a
queued job it cancels; the Celery task ``secateurs.deliver_webhook`` (``worker/webhook_tasks.py``) runs
:func:`app.webhooks.delivery.attempt`.
"""
