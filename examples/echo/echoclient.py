from speedysvc import ClientMethodsBase, connect
from echoserver import EchoServer

class EchoClient(ClientMethodsBase):
    def echo_json(self, data):
        return self.send(EchoServer.echo_json, [data])

if __name__ == '__main__':
    # Note: Replace 'shm://' with 'tcp://(host)' for remote services
    methods = EchoClient(connect(EchoServer, 'shm://'))
    print(methods.echo_json("Hello World!"))
