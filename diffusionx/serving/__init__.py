"""What the HTTP ingress decides, kept free of Ray and of the web framework's routes: the guard (keys, body
limits), a request's cost for admission, the preview store, the tier load view and the calibration
feedback. `deployments/ingress.py` binds these to FastAPI and to the tiers' DeploymentHandles."""
