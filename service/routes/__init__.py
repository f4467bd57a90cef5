"""HTTP routes: small routers that validate, call the classifier and shape responses."""
