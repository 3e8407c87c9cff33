"""The Telegram bot (aiogram 3): chat with streamed replies, wallet, usage, privacy report,
provider onboarding and admin commands, in English, Russian and French.

``cocoon bot`` runs it with long polling (:func:`bot.app.run_polling`); with
``COCOON_BOT_MODE=webhook`` it is served by ``cocoon web`` (:mod:`bot.webhook`).
"""
