"""The REST APIs existing clients speak, served on the page's port by the page's worker.

* ``fooocus_api``: mrhan1993/Fooocus-API's routes (``/v1|v2/generation/...``, ``/v1/engines/...``);
* ``sdapi``: the AUTOMATIC1111 subset that webuiapi, Open WebUI and SillyTavern call (``/sdapi/v1/...``);
* ``openai_images``: OpenAI's ``/v1/images/generations`` and ``/v1/models``;
* ``jobs``: every API request is a job of the one worker (``modules.async_worker``): ids,
  owners, progress, a bounded history, results and webhooks;
* ``auth``: API keys (``X-API-KEY``, ``Authorization: Bearer``) and the ``--auth`` logins
  (HTTP Basic);
* ``common``: errors, the route class (422 naming the field, body limit), image fields;
* ``app``: the routes together, the OpenAPI page, and how ``launch.py`` mounts them on
  Gradio's FastAPI app.

Each API maps its clients' fields onto our request dict (DESIGN.md section 4) and submits
it; parsing and checking stay in ``modules.generation_request`` / ``modules.image_inputs``.
"""
