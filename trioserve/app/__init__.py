"""Calling the user's app (layer 3): loading it, one app call, lifespan, the asyncio bridge."""
