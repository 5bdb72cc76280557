"""The example service of deploy/kubernetes: what the image's manager runs (service.ini).

Other pods call it over TCP through the headless Service (``tcp://greeter:5555``); a
container of the same pod calls it over shared memory (app.py).
"""
from speedysvc import ServerMethodsBase, msgpack_method


class Greeter(ServerMethodsBase):
    port = 5555          # the TCP port: the Deployment's containerPort and the Service's port
    name = 'greeter'     # names the shared-memory segments in /dev/shm

    @msgpack_method
    def greet(self, name):
        return f"Hello, {name}!"
